"""Benchmarks of issue #8 (`make bench`); see docs/performance.md."""
