"""`agl demo` end to end on the packaged model and the shipped aligned base, at a size that fits a test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
AGL = str(Path(sys.executable).parent / "agl")


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    cmd = [AGL, "demo", "--out", str(out), "--max-train", "24", "--max-eval", "128", "--fisher-examples", "16",
           "--threads", "1", "--workers", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_demo_prints_one_table_with_every_stage(demo_run):
    out, proc = demo_run
    for stage in range(1, 6):
        assert f"[{stage}/5]" in proc.stdout
    table = proc.stdout[proc.stdout.index("AGL demo"):]
    for row in ("| aligned base |", "| plain LoRA |", "| LoRA + AGL |", "Drift reduction"):
        assert row in table
    summary = json.loads((out / "demo.json").read_text())
    assert summary["table"] in proc.stdout
    assert set(summary["task_loss"]) == {"base", "plain", "agl"}
    assert (out / "demo.md").read_text().strip() == summary["table"].strip()
    for name in ("report.json", "report.md"):
        assert (out / "drift" / name).is_file()
    assert list((out / "drift").glob("*.png"))


def test_demo_trains_both_runs_identically_but_for_agl(demo_run):
    out, _ = demo_run
    summary = json.loads((out / "demo.json").read_text())
    plain, agl = summary["results"]["plain"], summary["results"]["agl"]
    assert plain["agl"] is None and agl["agl"]["mask_path"] == str(out / "mask")
    assert agl["last_metrics"]["agl/penalty"] > 0
    assert plain["task_loss"] != agl["task_loss"]
    from safetensors.torch import load_file

    wp, wa = load_file(str(Path(plain["adapter"]) / "adapter_model.safetensors")), \
        load_file(str(Path(agl["adapter"]) / "adapter_model.safetensors"))
    assert wp.keys() == wa.keys()
    assert any(not (wp[k] == wa[k]).all() for k in wp)
    report = json.loads((out / "drift" / "report.json").read_text())
    assert {m["name"] for m in report["models"]} == {"base", "plain", "agl"}


def test_each_fine_tunes_driftcheck_is_split_across_the_workers_and_merged(demo_run):
    out, proc = demo_run
    merged = [json.loads(line) for line in (out / "drift" / "results.jsonl").read_text().splitlines()]
    for name in ("plain", "agl"):
        parts = [[json.loads(line) for line in (out / "drift-runs" / f"{name}-part{i}of4" / "results.jsonl")
                  .read_text().splitlines()] for i in range(1, 5)]
        want = {(r["judge"], r["id"]): r["score"] for r in merged if r["model"] == name}
        assert len(want) == 2 * 128  # 128 prompts (4 batches of 32: one per part), margin and pattern judges
        assert {(r["judge"], r["id"]): r["score"] for rows in parts for r in rows if r["model"] == name} == want
        assert all(any(r["model"] == name for r in rows) for rows in parts)
        assert f"{name} judged 4/4: done" in proc.stdout
    # the Fisher mask starts as soon as the aligned base is there, before the checks that load the model
    assert proc.stdout.index("[2/5]") < proc.stdout.index("2 worker processes") < proc.stdout.index("[3/5]")


def test_demo_reuses_finished_stages(demo_run):
    out, first = demo_run
    assert "2 worker processes of 1 thread(s)" in first.stdout  # the first run trained both fine-tunes side by side
    before = json.loads((out / "demo.json").read_text())
    cmd = [AGL, "demo", "--out", str(out), "--max-train", "24", "--max-eval", "128", "--fisher-examples", "16",
           "--threads", "1", "--workers", "1"]  # the same stages in this one process: every one is reused
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "one process" in proc.stdout
    after = json.loads((out / "demo.json").read_text())
    assert after["task_loss"] == before["task_loss"]
    assert after["timings_s"]["plain"] < before["timings_s"]["plain"]
    assert "fisher mask" not in after["timings_s"]  # the mask was reused, not estimated again
    assert "Fisher mask: reused" in proc.stdout
    assert after["timings_s"]["plain judged"] < before["timings_s"]["plain judged 1/4"]  # rows of every part reused
    report = json.loads((out / "drift" / "report.json").read_text())  # rebuilt from the reused rows
    assert {m["name"] for m in report["models"]} == {"base", "plain", "agl"}


def test_demo_refuses_to_mix_runs_with_other_settings(demo_run):
    out, _ = demo_run
    cmd = [AGL, "demo", "--out", str(out), "--max-train", "12", "--max-eval", "128", "--fisher-examples", "16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 2
    assert "holds a demo run with other settings (max_train)" in proc.stderr and "--overwrite" in proc.stderr


def test_demo_rejects_bad_input(tmp_path):
    proc = subprocess.run([AGL, "demo", "--out", str(tmp_path), "--max-train", "0"], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert proc.returncode == 2
    assert "--max-train=0 is invalid: must be ≥ 1." in proc.stderr
