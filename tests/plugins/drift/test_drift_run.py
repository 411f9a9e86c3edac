"""run_drift end to end on tiny models: reports, resuming after an interruption, settings, overlap, templates."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from PIL import Image

from agl_plugins.cli import main
from agl_plugins.drift import SCHEMA_VERSION, report_from_folder, run_drift
from agl_plugins.hookspecs import hookimpl
from agl_plugins.manager import get_plugin_manager

import tiny
from driftrows import ROWS, write_jsonl

FAST = dict(max_new_tokens=6, batch_size=4, max_generations=6, progress=False, device="cpu")


class CountingJudge:
    """A generation judge that counts what it sees and can interrupt the run (Ctrl+C) at a given call."""

    def __init__(self, explode_at=None):
        self.calls, self.seen, self.explode_at = 0, [], explode_at

    def __call__(self, prompts, responses):
        self.calls += 1
        if self.calls == self.explode_at:
            raise KeyboardInterrupt
        self.seen += list(prompts)
        return [float(len(r) % 2) for r in responses]

    def settings(self):
        return {"version": 1}


def pm_with(judge):
    class Plugin:
        @hookimpl
        def agl_drift_judges(self):
            return {"count": judge}

    pm = get_plugin_manager()
    pm.register(Plugin(), name="counting")
    return pm


def run(setup, out, **kw):
    opts = dict(model=setup["model"], out=str(out), prompts=[setup["prompts"]],
                adapters={"agl": setup["agl"], "plain": setup["plain"]}, **FAST)
    opts.update(kw)
    return run_drift(**opts)


def read_rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(drift_setup, tmp_path_factory):
    """An uninterrupted run with the counting judge: the reference for the resumed runs."""
    out = tmp_path_factory.mktemp("full")
    judge = CountingJudge()
    report = run(drift_setup, out, judges=["margin", "pattern", "count"], pm=pm_with(judge),
                 compare={"agl": "agl", "plain": "plain"})
    return out, report, judge


def test_report_schema_files_and_rows(full_run):
    out, report, judge = full_run
    assert report["schema_version"] == SCHEMA_VERSION == 1
    assert [m["name"] for m in report["models"]] == ["base", "agl", "plain"]
    assert [m["role"] for m in report["models"]] == ["reference", "agl", "plain"]
    assert [(j["name"], j["kind"], j["n_prompts"]) for j in report["judges"]] == [
        ("margin", "model", 14), ("pattern", "generation", 6), ("count", "generation", 6)]
    for key in ("metrics", "drift", "drift_reduction"):
        assert report[key] and all(e["judge"] in ("margin", "pattern", "count") for e in report[key])
    assert {e["metric"] for e in report["metrics"]} == {"refusal_rate", "over_refusal_rate",
                                                       "mean_margin_unsafe", "mean_margin_safe"}
    assert report["prompts"] == {"n": 14, "unsafe": 8, "safe": 6,
                                 "categories": {"safe": {"trivia": 6}, "unsafe": {"crime": 4, "weapons": 4}}}
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["metrics"] == report["metrics"] and on_disk["files"]["plots"] == report["files"]["plots"]
    rows = read_rows(out)
    assert len(rows) == 3 * 14 + 2 * 3 * 6 and judge.calls == 3 * 2  # 6 generation prompts = 2 batches of 4 + 2
    assert all(isinstance(r["response"], str) for r in rows if r["judge"] != "margin")
    md = (out / "report.md").read_text()
    for text in ("# DriftCheck report", "## Drift from `base`", "## Drift reduction: `agl` vs `plain`",
                 "## Per category (judge `margin`)", "`count` (generation judge, 6 prompts)", "![refusal_rates.png]"):
        assert text in md
    assert report["files"]["plots"] == ["refusal_rates.png", "categories_margin.png", "margins_margin.png",
                                        "categories_pattern.png", "categories_count.png"]
    for name in report["files"]["plots"]:
        with Image.open(out / name) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 500 and img.size[1] > 200


def test_interrupted_run_resumes_without_repeating_a_prompt(drift_setup, full_run, tmp_path):
    ref_out, _, _ = full_run
    judge = CountingJudge(explode_at=3)  # Ctrl+C during the second model's first generation batch
    with pytest.raises(KeyboardInterrupt):
        run(drift_setup, tmp_path, judges=["margin", "pattern", "count"], pm=pm_with(judge))
    partial = read_rows(tmp_path)
    assert 0 < len(partial) < len(read_rows(ref_out))
    run(drift_setup, tmp_path, judges=["margin", "pattern", "count"], pm=pm_with(judge))
    rows = read_rows(tmp_path)
    keys = [(r["model"], r["judge"], r["id"]) for r in rows]
    assert len(keys) == len(set(keys))  # nothing evaluated twice
    text = {r["id"]: r["prompt"] for r in ROWS}
    assert sorted(judge.seen) == sorted(text[r["id"]] for r in read_rows(ref_out) if r["judge"] == "count")
    assert sorted(map(json.dumps, rows)) == sorted(map(json.dumps, read_rows(ref_out)))
    mtime = (tmp_path / "results.jsonl").stat().st_mtime_ns
    again = CountingJudge()
    run(drift_setup, tmp_path, judges=["margin", "pattern", "count"], pm=pm_with(again))
    assert again.calls == 0 and (tmp_path / "results.jsonl").stat().st_mtime_ns == mtime  # all done: nothing re-run


def test_other_settings_in_the_same_folder_are_refused(drift_setup, full_run, tmp_path):
    ref_out, _, _ = full_run
    shutil.copytree(ref_out, tmp_path / "copy")
    with pytest.raises(ValueError, match=r"holds results of a run with different settings \(max_new_tokens: 6 → 7"):
        run(drift_setup, tmp_path / "copy", judges=["margin", "pattern", "count"], pm=pm_with(CountingJudge()),
            max_new_tokens=7)
    report = run(drift_setup, tmp_path / "copy", judges=["margin"], overwrite=True, plots=False)
    assert [j["name"] for j in report["judges"]] == ["margin"] and report["files"]["plots"] == []
    assert {r["judge"] for r in read_rows(tmp_path / "copy")} == {"margin"}


def test_a_torn_last_line_is_redone_and_a_damaged_file_refused(drift_setup, tmp_path, caplog):
    run(drift_setup, tmp_path, judges=["margin"], adapters={}, plots=False)
    results = tmp_path / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[:-1]) + lines[-1][:20])  # killed in the middle of the last write
    with caplog.at_level(logging.WARNING, logger="agl_plugins.drift"):
        run(drift_setup, tmp_path, judges=["margin"], adapters={}, plots=False)
    assert "Dropping an incomplete last line" in caplog.text
    assert results.read_text().splitlines(keepends=True) == lines
    results.write_text("".join(lines[:3]) + "garbage\n" + "".join(lines[3:]))
    with pytest.raises(ValueError, match="results.jsonl' line 4 is damaged"):
        run(drift_setup, tmp_path, judges=["margin"], adapters={}, plots=False)


def test_report_is_rebuilt_from_the_folder_with_another_reference(full_run):
    out, report, _ = full_run
    again = report_from_folder(out, reference="agl", compare=None)
    assert again["reference"] == "agl" and again["drift_reduction"] == []
    assert {e["model"] for e in again["drift"]} == {"base", "plain"}
    assert again["metrics"] == report["metrics"]  # same seed, same numbers


def test_evaluating_on_the_masks_own_prompts_warns(drift_setup, tmp_path, caplog):
    mask = tmp_path / "mask"
    assert main(["fisher", "--model", drift_setup["model"], "--data", drift_setup["prompts"], "--out", str(mask),
                 "--max-examples", "4", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    adapter = tmp_path / "agl"
    shutil.copytree(drift_setup["agl"], adapter)
    shutil.copy(mask / "mask.safetensors", adapter / "mask.safetensors")
    with caplog.at_level(logging.WARNING, logger="agl_plugins.drift"):
        report = run(drift_setup, tmp_path / "out", judges=["margin"], adapters={"agl": str(adapter)}, plots=False)
    warning = [w for w in report["warnings"] if "were used to estimate the mask" in w]
    assert len(warning) == 1 and warning[0].startswith("4 of 14 evaluation prompts")
    assert "same normalised text" in warning[0]
    assert "were used to estimate the mask" in caplog.text
    assert "> **Warning:** 4 of 14 evaluation prompts" in (tmp_path / "out" / "report.md").read_text()
    held_out = [r for r in ROWS if r["id"] not in {"u0", "u1", "s0", "s1"}]  # the mask took these four
    clean = write_jsonl(tmp_path / "clean.jsonl", held_out)
    report = run(drift_setup, tmp_path / "out2", judges=["margin"], adapters={}, prompts=[str(clean)],
                 mask=str(mask), plots=False)
    assert not [w for w in report["warnings"] if "estimate the mask" in w]


def test_model_without_chat_template(drift_setup, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(drift_setup["model"], bare)
    tok = tiny.tiny_tokenizer()
    tok.chat_template = None
    tok.save_pretrained(bare)
    cfg = json.loads((bare / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(cfg))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="has no chat template.*--no-chat-template"):
        run(drift_setup, tmp_path / "o", model=str(bare), adapters={}, judges=["margin"])
    report = run(drift_setup, tmp_path / "o2", model=str(bare), adapters={}, judges=["margin"],
                 use_chat_template=False, plots=False)
    assert report["settings"]["chat_template"] is False and report["metrics"]


def test_judge_model_in_memory_gives_the_rows_of_a_run(drift_setup, full_run):
    from transformers import AutoModelForCausalLM

    from agl_plugins.drift import compute_tables, judge_model, load_eval_prompts

    model = AutoModelForCausalLM.from_pretrained(drift_setup["model"]).eval()
    records = load_eval_prompts([drift_setup["prompts"]])
    rows = judge_model(model, tiny.tiny_tokenizer(), records, name="base", judges=["margin", "pattern"],
                       max_generations=6, max_new_tokens=6, batch_size=4)
    stored = {(r["judge"], r["id"]): r for r in read_rows(full_run[0])
              if r["model"] == "base" and r["judge"] != "count"}
    assert len(rows) == len(stored) == 14 + 6
    for row in rows:  # the run evaluated the base through the PeftModel with adapters disabled: equal to 1e-5
        want = stored[(row["judge"], row["id"])]
        assert {k: v for k, v in row.items() if k != "value"} == {k: v for k, v in want.items() if k != "value"}
        if want["value"] is None:
            assert row["value"] is None
        else:
            assert row["value"] == pytest.approx(want["value"], rel=1e-5, abs=1e-5)
    tables, _ = compute_tables(rows, ["base"], [("margin", "model"), ("pattern", "generation")])
    assert {(e["judge"], e["metric"]) for e in tables.metrics if e["category"] is None} == {
        ("margin", "refusal_rate"), ("margin", "over_refusal_rate"), ("margin", "mean_margin_unsafe"),
        ("margin", "mean_margin_safe"), ("pattern", "refusal_rate"), ("pattern", "over_refusal_rate")}


def test_rows_of_an_earlier_folder_are_reused_where_they_would_be_identical(drift_setup, full_run, tmp_path):
    ref_out, _, _ = full_run
    src = tmp_path / "src"
    shutil.copytree(ref_out, src)
    rows = read_rows(src)
    for r in rows:  # doctored: a reused row shows the doctored score, a re-evaluated one the real score
        if r["model"] == "base" and r["judge"] == "count":
            r["score"] = 1.0 - r["score"]
    (src / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    doctored = {(r["model"], r["judge"], r["id"]): r["score"] for r in rows}
    judges = dict(judges=["margin", "pattern", "count"], plots=False)
    lines = []

    judge = CountingJudge()  # same base and same 'plain' file: nothing is evaluated
    run_drift(model=drift_setup["model"], out=str(tmp_path / "a"), prompts=[drift_setup["prompts"]],
              adapters={"plain": drift_setup["plain"]}, pm=pm_with(judge), reuse=[str(src)], log_fn=lines.append,
              **judges, **FAST)
    assert judge.calls == 0
    got = {(r["model"], r["judge"], r["id"]): r["score"] for r in read_rows(tmp_path / "a")}
    assert got == {k: v for k, v in doctored.items() if k[0] in ("base", "plain")}
    assert any("reused" in line and "base, plain" in line for line in lines)

    judge = CountingJudge()  # 'plain' names another file now: only the base is reused
    run_drift(model=drift_setup["model"], out=str(tmp_path / "b"), prompts=[drift_setup["prompts"]],
              adapters={"plain": drift_setup["agl"]}, pm=pm_with(judge), reuse=[str(src)], **judges, **FAST)
    assert judge.calls == 2  # the 6 generation prompts of 'plain' (batches of 4 + 2)
    got = {(r["model"], r["judge"], r["id"]): r["score"] for r in read_rows(tmp_path / "b")}
    assert {k: v for k, v in got.items() if k[0] == "base"} == {k: v for k, v in doctored.items() if k[0] == "base"}

    judge, lines = CountingJudge(), []  # other generation settings: nothing reused, and the log says why
    run_drift(model=drift_setup["model"], out=str(tmp_path / "c"), prompts=[drift_setup["prompts"]], adapters={},
              pm=pm_with(judge), reuse=[str(src)], log_fn=lines.append, **judges, **dict(FAST, max_new_tokens=7))
    assert judge.calls == 2 and any("nothing reused (max_new_tokens differ)" in line for line in lines)

    with pytest.raises(ValueError, match="is the --out folder itself"):
        run(drift_setup, src, reuse=[str(src)])
    with pytest.raises(ValueError, match="holds no DriftCheck run"):
        run(drift_setup, tmp_path / "d", reuse=[str(tmp_path / "nothing")])


def test_parts_judge_disjoint_batches_and_a_full_run_merges_them(drift_setup, full_run, tmp_path):
    ref_out, ref_report, _ = full_run
    judges = dict(judges=["margin", "pattern", "count"], compare={"agl": "agl", "plain": "plain"})
    seen, lines = [], []
    for i in (1, 2):
        judge = CountingJudge()
        report = run(drift_setup, tmp_path / f"p{i}", pm=pm_with(judge), part=(i, 2), log_fn=lines.append, **judges)
        assert judge.calls == 3  # one generation batch (of the first 6 prompts) for each of the 3 models
        assert any("part" in w and f"{i} of 2" in w for w in report["warnings"])
        seen.append({r["id"] for r in read_rows(tmp_path / f"p{i}")})
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {r["id"] for r in read_rows(ref_out)}
    assert any("judged part 1 of 2" in line for line in lines)

    judge = CountingJudge()  # every row comes from the parts: nothing is judged again
    merged = run(drift_setup, tmp_path / "all", pm=pm_with(judge), reuse=[str(tmp_path / "p1"), str(tmp_path / "p2")],
                 **judges)
    assert judge.calls == 0
    key = lambda r: (r["model"], r["judge"], r["id"])  # noqa: E731
    want = {key(r): (r["score"], r["value"]) for r in read_rows(ref_out)}
    assert {key(r): (r["score"], r["value"]) for r in read_rows(tmp_path / "all")} == want
    assert merged["metrics"] == ref_report["metrics"] and merged["drift_reduction"] == ref_report["drift_reduction"]


@pytest.mark.parametrize("part", [(0, 2), (3, 2), (1,), "1/2", (1.0, 2), (True, 1)])
def test_a_bad_part_is_refused(drift_setup, tmp_path, part):
    with pytest.raises(ValueError, match="part=.* is invalid: give \\(i, n\\)"):
        run(drift_setup, tmp_path, part=part)


def test_the_cli_part_flag(drift_setup, tmp_path, capsys):
    from agl_plugins.drift.cli import parse_part

    assert parse_part("2/3") == (2, 3) and parse_part(None) is None
    for bad in ("2", "a/b", "1/"):
        with pytest.raises(ValueError, match="--part .* is malformed: write I/N"):
            parse_part(bad)
    code = main(["drift", "--model", drift_setup["model"], "--prompts", drift_setup["prompts"], "--out",
                 str(tmp_path / "o"), "--part", "3/2", "--device", "cpu", "--no-plots"])
    assert code != 0 and "part=(3, 2) is invalid" in capsys.readouterr().err
