"""`agl forgetting` end to end on synthetic runs: report files, numbers equal to the fit, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from agl_plugins.cli import main
from agl_plugins.forgetting.fit import fit_law
from agl_plugins.forgetting.probe import summarize
from agl_plugins.forgetting.recorder import FORGET_FILE
from synth import synth_nll, write_run


@pytest.fixture
def runs(tmp_path):
    """Three LoRA seeds (β = 0.45) and three AGL seeds (β = 0.2), one folder each."""
    out = {}
    for s in range(3):
        out[f"lora{s}"] = write_run(tmp_path / f"lora{s}", *synth_nll(0.05, 0.45, seed=s), tokens_per_step=512)
        out[f"agl{s}"] = write_run(tmp_path / f"agl{s}", *synth_nll(0.05, 0.2, seed=10 + s), agl_enabled=True,
                                   tokens_per_step=512)
    return out


def agl(*argv):
    return main(["forgetting", *map(str, argv)])


def test_report_files_parse_and_match_the_fit(runs, tmp_path, capsys):
    out = tmp_path / "report"
    labels = [f"--label=lora={runs[f'lora{s}']}" for s in range(3)] + [f"--label=agl={runs[f'agl{s}']}" for s in range(3)]
    assert agl(*labels, "--out", out, "--extrapolate", "--resamples", 200) == 0
    printed = capsys.readouterr().out
    assert "| `lora` | 3 | 11 |" in printed and "`agl` − `lora`" in printed and "Wrote report.json" in printed
    report = json.loads((out / "report.json").read_text())
    assert (out / "forgetting.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "## Fitted law" in md and "## Extrapolation" in md and "![forgetting curves](forgetting.png)" in md
    lora = report["methods"][0]
    assert lora["label"] == "lora" and lora["runs"] == 3
    # the reported law is the fit of the mean of the seeds' curves, recomputed here from the raw rows
    curves = []
    for s in range(3):
        rows = [json.loads(line) for line in (runs[f"lora{s}"] / FORGET_FILE).read_text().splitlines()]
        curves.append([summarize(r["labels"], np.array(r["prompt_nll"]))["nll"] for r in rows])
        steps = np.array([r["step"] for r in rows], dtype=float)
    mean = np.mean(curves, axis=0)
    fit, _ = fit_law(steps[1:], mean[1:], mean[0], "auto")
    assert (lora["fit"]["A"], lora["fit"]["beta"], lora["fit"]["E"]) == pytest.approx((fit.A, fit.beta, fit.E))
    assert lora["fit"]["ci"]["beta"][0] <= lora["fit"]["beta"] <= lora["fit"]["ci"]["beta"][1]
    assert f"{lora['fit']['beta']:.4g} [" in md
    (diff,) = report["comparisons"]
    assert diff["paired"] and diff["beta"]["ci"][1] < 0  # AGL's curve is flatter, and the interval says so


def test_bare_paths_x_tokens_and_jsonl_file(runs, tmp_path):
    out = tmp_path / "r2"
    assert agl(runs["lora0"], runs["agl0"] / FORGET_FILE, "--x", "tokens", "--resamples", 50, "--no-plots",
               "--out", out) == 0
    report = json.loads((out / "report.json").read_text())
    assert [m["label"] for m in report["methods"]] == ["lora0", "agl0"]
    assert report["methods"][0]["D"][1:] == [512.0 * s for s in report["methods"][0]["steps"][1:]]
    assert not (out / "forgetting.png").exists()
    # β does not depend on the unit of D; A does (A·D^β is the same excess)
    steps_out = tmp_path / "r3"
    agl(runs["lora0"], "--resamples", 50, "--no-plots", "--out", steps_out)
    by_steps = json.loads((steps_out / "report.json").read_text())["methods"][0]["fit"]
    by_tokens = report["methods"][0]["fit"]
    assert by_tokens["beta"] == pytest.approx(by_steps["beta"], rel=1e-6)
    assert by_tokens["A"] * 512.0 ** by_tokens["beta"] == pytest.approx(by_steps["A"], rel=1e-6)


def rewrite(path, edit):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows = edit(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def error_of(capsys, *argv) -> str:
    assert agl(*argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_give_clear_errors(runs, tmp_path, capsys):
    out = ["--out", tmp_path / "bad"]
    assert "No forgetting measurements at" in error_of(capsys, tmp_path / "nowhere", *out)
    assert "--label 'lora' is malformed" in error_of(capsys, "--label", "lora", *out)
    assert "No runs given" in error_of(capsys, *out)

    f = runs["lora1"] / FORGET_FILE
    rewrite(f, lambda rows: [rows[0], rows[2], rows[1], *rows[3:]])
    assert "does not increase" in error_of(capsys, runs["lora1"], *out)
    rewrite(f, lambda rows: sorted(rows, key=lambda r: r["step"])[1:])
    assert "L0 (the loss before training) is missing" in error_of(capsys, runs["lora1"], *out)

    f = runs["lora2"] / FORGET_FILE
    rewrite(f, lambda rows: rows[:3])
    assert "Only 2 measurement(s) after step 0" in error_of(capsys, runs["lora2"], *out)

    f = runs["agl2"] / FORGET_FILE
    rewrite(f, lambda rows: [*rows[:4], {**rows[4], "prompt_nll": [None] * len(rows[4]["ids"])}, *rows[5:]])
    assert "non-finite per-prompt losses" in error_of(capsys, runs["agl2"], *out)
    f.write_text(f.read_text() + '{"format": "agl-forgetting", "st')
    assert "not valid JSON" in error_of(capsys, runs["agl2"], *out)

    rewrite(runs["agl1"] / FORGET_FILE, lambda rows: [{**r, "ids": r["ids"][::-1]} for r in rows])
    assert "measured different prompts" in error_of(capsys, f"--label=a={runs['agl0']}", f"--label=a={runs['agl1']}",
                                                    *out)
    assert "has no token counts" in error_of(capsys, write_run(tmp_path / "nt", *synth_nll(0.1, 0.3)), "--x",
                                             "tokens", *out)
    assert "--baseline 'x' is not one of" in error_of(capsys, runs["lora0"], "--baseline", "x", *out)
    assert "is given twice" in error_of(capsys, runs["lora0"], f"--label=b={runs['lora0']}", *out)


def test_extrapolate_needs_enough_points(tmp_path, capsys):
    steps, nll, labels = synth_nll(0.05, 0.4, steps=[0, 1, 2, 4, 8])
    folder = write_run(tmp_path / "short", steps, nll, labels)
    assert main(["forgetting", str(folder), "--extrapolate", "--out", str(tmp_path / "o")]) == 2
    assert "--extrapolate needs at least 5 measurements after step 0 (this curve has 4)" in capsys.readouterr().err
    steps, nll, labels = synth_nll(0.05, 0.4, steps=[0, 1, 2, 4, 8, 16])  # 5 points: 3 to fit, 2 to test
    assert main(["forgetting", str(write_run(tmp_path / "five", steps, nll, labels)), "--extrapolate",
                 "--resamples", "20", "--out", str(tmp_path / "o5")]) == 0
    report = json.loads((tmp_path / "o5" / "report.json").read_text())  # parses: no inf/NaN in the JSON
    assert report["methods"][0]["extrapolation"]["test_points"] == 2
    assert main(["forgetting", str(tmp_path / "five"), "--extrapolate", "--residual", "on", "--out", str(tmp_path / "o")]) == 2
    assert "needs at least 7 measurements after step 0 (this curve has 5)" in capsys.readouterr().err
