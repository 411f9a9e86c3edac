"""`agl benchmark` end to end on the packaged model and the shipped aligned base, at a size that fits a test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

AGL = str(Path(sys.executable).parent / "agl")
SMALL = ["--max-train", "16", "--max-eval", "12", "--fisher-examples", "8", "--threads", "1"]


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


def _bench(out, *extra, timeout=1200):
    cmd = [AGL, "benchmark", "--out", str(out), "--tasks", "arith", "--seeds", "0", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=timeout)


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = _bench(out, "--variants", "plain", "block16-1", *SMALL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_benchmark_writes_one_row_per_run_and_a_summary(bench_run):
    out, proc = bench_run
    rows = _rows(out)
    assert [(r["task"], r["seed"], r["variant"]) for r in rows] == [
        ("arith", None, "base"), ("arith", 0, "plain"), ("arith", 0, "block16-1")]
    for r in rows:
        assert len(r["scores"]) == 12 and 0.0 <= r["refusal"] <= 1.0 and r["task_loss"] > 0
    plain, agl = rows[1], rows[2]
    assert plain["agl"] is None and agl["agl"] is not None
    assert (out / "adapters" / "arith" / "0" / "block16-1").is_dir()
    assert json.loads((out / "sizes.json").read_text())["max_train"] == 16
    summary = (out / "results.md").read_text()
    assert any(line.startswith("| block16-1 | 0 |") for line in summary.splitlines())
    assert "| block16-1 | 0 |" in proc.stdout  # the summary is printed too


def test_benchmark_resumes_without_training_finished_runs_again(bench_run):
    out, _ = bench_run
    before = (out / "results.jsonl").read_text()
    proc = _bench(out, "--variants", "plain", "block16-1", *SMALL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[benchmark] task=" not in proc.stdout
    assert (out / "results.jsonl").read_text() == before


def test_benchmark_refuses_runs_of_other_sizes_in_one_folder(bench_run):
    out, _ = bench_run
    before = (out / "results.jsonl").read_text()
    proc = _bench(out, "--variants", "plain", "--max-train", "8", "--max-eval", "12", "--fisher-examples", "8",
                  timeout=600)
    assert proc.returncode == 2
    assert "holds benchmark runs of other data sizes (max_train: 16 there, 8 now)" in proc.stderr
    assert (out / "results.jsonl").read_text() == before


def test_benchmark_rejects_bad_input(tmp_path):
    proc = _bench(tmp_path, "--variants", "plain", "block99", timeout=600)
    assert proc.returncode == 2 and "Unknown variant(s) ['block99']" in proc.stderr
    proc = _bench(tmp_path, "--max-train", "0", timeout=600)
    assert proc.returncode == 2 and "--max-train=0 is invalid: must be ≥ 1." in proc.stderr
    assert not (tmp_path / "results.jsonl").exists()
