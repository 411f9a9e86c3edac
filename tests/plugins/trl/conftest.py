"""Puts tests/plugins/hf (hfkit) on sys.path for the TRL adapter tests, before their modules are imported."""

import sys
from pathlib import Path

HF_TESTS = str(Path(__file__).resolve().parent.parent / "hf")
if HF_TESTS not in sys.path:
    sys.path.insert(0, HF_TESTS)
