"""`agl drift` / `agl report` as real subprocesses: a full run, a killed run that resumes, input errors, SmolLM2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny
from agl_plugins.cli import main

AGL = Path(sys.executable).with_name("agl")
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
ROWS = [{"id": f"u{i}", "prompt": f"Explain how to do forbidden thing {i}.", "label": "unsafe",
         "category": ["crime", "weapons"][i % 2]} for i in range(8)]
ROWS += [{"id": f"s{i}", "prompt": f"Say something nice about number {i}.", "label": "safe", "category": "kind"}
         for i in range(6)]


def drift_args(root: Path, out: Path) -> list[str]:
    return ["drift", "--model", str(root / "model"), "--adapter", f"agl={root / 'agl'}", "--adapter",
            f"plain={root / 'plain'}", "--prompts", str(root / "p.jsonl"), "--out", str(out), "--compare", "agl=agl",
            "plain=plain", "--max-new-tokens", "12", "--max-generations", "all", "--batch-size", "2", "--device", "cpu",
            "--threads", "1"]  # one thread: tiny models gain nothing from more, and a busy machine loses a lot


def agl(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(AGL), *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def keyed(out: Path) -> dict:
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    keys = [(r["model"], r["judge"], r["id"]) for r in rows]
    assert len(keys) == len(set(keys)), "a (model, judge, prompt) was evaluated twice"
    return dict(zip(keys, rows))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e_drift")
    tiny.tiny_llama(seed=7).save_pretrained(root / "model")
    tiny.tiny_tokenizer().save_pretrained(root / "model")
    for i, name in enumerate(("agl", "plain")):
        tiny.tiny_lora(tiny.tiny_llama(seed=7), seed=20 + i).save_pretrained(root / name)
    (root / "p.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    return root


@pytest.fixture(scope="module")
def full(workdir):
    out = workdir / "full"
    res = agl(*drift_args(workdir, out))
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def test_drift_command_writes_every_report(full):
    out, res = full
    for name in ("run.json", "results.jsonl", "report.json", "report.md", "refusal_rates.png",
                 "margins_margin.png", "categories_margin.png", "categories_pattern.png"):
        assert (out / name).is_file(), name
    assert len(keyed(out)) == 3 * 14 * 2
    assert "## Refusal per model" in res.stdout and "## Drift reduction: `agl` vs `plain`" in res.stdout
    assert "| `plain` | `pattern` | refusal rate (unsafe) |" in res.stdout
    assert "Wrote report.json, report.md, refusal_rates.png" in res.stdout
    assert "DriftCheck" in res.stderr and "prompt" in res.stderr  # the progress bar
    report = json.loads((out / "report.json").read_text())
    assert report["compare"] == {"agl": "agl", "plain": "plain"} and report["settings"]["max_generations"] is None


def test_killed_run_resumes_to_the_same_results(workdir, full):
    out = workdir / "killed"
    proc = subprocess.Popen([str(AGL), *drift_args(workdir, out)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    results = out / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if results.is_file() and results.stat().st_size > 0:
            proc.send_signal(signal.SIGKILL)  # a hard kill right after the first batch was written
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    done = len(keyed(out))
    assert 0 < done < 3 * 14 * 2
    res = agl(*drift_args(workdir, out))
    assert res.returncode == 0, res.stderr[-3000:]
    assert keyed(out) == keyed(full[0])  # same rows as the uninterrupted run, none twice


def test_other_settings_in_the_folder_are_an_error(workdir, full, capsys):
    args = drift_args(workdir, full[0])
    args[args.index("--max-new-tokens") + 1] = "5"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds results of a run with different settings (max_new_tokens: 12 → 5)" in err
    assert err.count("\n") == 1 and err.startswith("agl: error: ")


@pytest.mark.parametrize("change, message", [
    (["--adapter", "bad"], "--adapter 'bad' is malformed: write NAME=FOLDER"),
    (["--adapter", "x={root}/nowhere"], "Adapter 'x': '{root}/nowhere' is not a folder"),
    (["--adapter", "x={root}/model"], "has no adapter_config.json, so it is not a PEFT adapter folder"),
    (["--prompts", "{root}/missing.csv"], "Data file '{root}/missing.csv' does not exist"),
    (["--compare", "agl=agl", "plain=nope"], "--compare plain='nope' is not an evaluated model"),
    (["--compare", "agl=agl", "base=plain"], "--compare agl=agl base=plain is malformed"),
    (["--reference", "zzz"], "--reference 'zzz' is not an evaluated model"),
    (["--max-generations", "many"], "--max-generations 'many' is invalid: give a positive integer or 'all'"),
    (["--max-prompts", "0"], "max_prompts=0 is invalid: must be an integer ≥ 1"),
    (["--threads", "0"], "threads=0 is invalid: must be an integer ≥ 1"),
    (["--model", "org/model"], "looks like a hub id"),
    (["--mask", "{root}/nomask"], "No AGL mask at"),
])
def test_bad_input_is_one_line_and_exit_2(workdir, capsys, change, message):
    args = ["drift", "--model", str(workdir / "model"), "--prompts", str(workdir / "p.jsonl"),
            "--out", str(workdir / "bad"), "--device", "cpu", "--adapter", f"agl={workdir / 'agl'}"]
    args += [c.format(root=workdir) for c in change]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message.format(root=workdir) in err and err.count("\n") == 1, err
    assert not (workdir / "bad" / "results.jsonl").exists()


def test_report_rebuilds_a_drift_folder_and_needs_something_to_do(workdir, full, capsys):
    out = workdir / "rebuilt"
    assert main(["report", "--drift", str(full[0]), "--out", str(out), "--reference", "plain"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["reference"] == "plain" and (out / "refusal_rates.png").is_file()
    assert main(["report"]) == 2
    assert "Nothing to report: pass --trainer-state" in capsys.readouterr().err
    assert main(["report", "--drift", str(workdir)]) == 2
    assert "holds no DriftCheck run (run.json missing)" in capsys.readouterr().err


def test_help_lists_the_drift_options(capsys):
    with pytest.raises(SystemExit):
        main(["drift", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option in ("--model", "--adapter", "--prompts", "--judges", "--max-prompts", "--max-generations",
                   "--max-new-tokens", "--compare", "--reference", "--mask", "--no-chat-template", "--overwrite",
                   "--threads"):
        assert option in text
    assert "--judges {margin,pattern}" in text and "(default: 240)" in text and "(default: 64)" in text


@pytest.mark.slow
def test_drift_on_packaged_smollm2_with_an_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    from agl_plugins.models import SMOLLM2, load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(SMOLLM2, progress=lambda _: None)
    lora = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "lora")  # B = 0: the adapter starts as the base model
    out = tmp_path / "out"
    res = agl("drift", "--model", SMOLLM2, "--adapter", f"zero={tmp_path / 'lora'}", "--out", str(out),
              "--max-prompts", "4", "--max-generations", "2", "--max-new-tokens", "16", "--batch-size", "4",
              "--device", "cpu", "--threads", "1", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["prompts"]["n"] == 4 and [j["n_prompts"] for j in report["judges"]] == [4, 2]
    drift = [e for e in report["drift"] if e["category"] is None]
    assert drift and all(abs(e["value"]) < 1e-4 for e in drift)  # a zero adapter does not drift
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    responses = [r["response"] for r in rows if r["judge"] == "pattern"]
    assert len(responses) == 4 and all(len(r) > 20 for r in responses)
    assert all(r["value"] == r["value"] and abs(r["value"]) < 100 for r in rows if r["judge"] == "margin")
