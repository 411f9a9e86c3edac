"""`agl benchmark`'s paired drift reduction and its results table, on synthetic per-prompt scores."""

import json

import numpy as np
import pytest

from agl_plugins.demo.benchmark import VARIANTS, _append, _read, paired_reduction, write_summary


def test_paired_reduction_matches_the_definition_and_covers_it():
    rng = np.random.default_rng(0)
    base = np.ones(300)
    plain = (rng.random(300) < 0.2).astype(float)  # drift ≈ -0.8
    agl = np.maximum(plain, (rng.random(300) < 0.6).astype(float))
    value, lo, hi = paired_reduction(base, plain, agl)
    expected = 1 - (agl.mean() - 1) / (plain.mean() - 1)
    assert value == pytest.approx(expected)
    assert lo < value < hi and 0 < lo and hi < 1


def test_paired_reduction_is_undefined_without_plain_drift():
    base = np.ones(50)
    assert paired_reduction(base, base.copy(), np.zeros(50)) == (None, None, None)


def test_summary_table_pairs_each_variant_with_plain_of_its_seed(tmp_path):
    records = [{"label": "unsafe"}] * 4 + [{"label": "safe"}] * 2
    rows = [
        {"task": "sure", "seed": None, "variant": "base", "task_loss": 2.0, "refusal": 1.0, "overrefusal": 0.5,
         "scores": [1, 1, 1, 1, 1, 0]},
        {"task": "sure", "seed": 0, "variant": "plain", "task_loss": 1.0, "refusal": 0.0, "overrefusal": 0.0,
         "scores": [0, 0, 0, 0, 0, 0]},
        {"task": "sure", "seed": 0, "variant": "lambda-1e3", "task_loss": 1.25, "refusal": 0.75, "overrefusal": 0.5,
         "scores": [1, 1, 1, 0, 1, 0]},
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_summary(tmp_path, records)
    text = (tmp_path / "results.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| lambda-1e3 |"))
    assert "| 75.0 | 50.0 | 1.2500 | +25.0 % | 75.0 %" in line
    assert "| aligned base | – | 100.0 | 50.0 | 2.0000 |" in text


def test_every_variant_is_plain_or_a_valid_agl_config():
    from agl_core.config import AGLConfig

    assert VARIANTS["plain"] is None
    for name, spec in VARIANTS.items():
        if spec is not None:
            mask, penalty = spec  # penalty None: no AGL training ('projected' uses only the mask)
            AGLConfig(**{k: v for k, v in mask.items() if k != "contrastive"}, **(penalty or {}))  # raises if bad
    assert VARIANTS["projected"][1] is None and VARIANTS["projected"][0]["k_out"] == "all"


def test_seed_means_pool_the_prompts_of_every_seed(tmp_path):
    records = [{"label": "unsafe"}] * 4 + [{"label": "safe"}] * 2
    rows = [{"task": "arith", "seed": None, "variant": "base", "task_loss": 2.0, "refusal": 1.0, "overrefusal": 0.5,
             "scores": [1, 1, 1, 1, 1, 0]}]
    for seed, (plain, agl, lp, la) in enumerate([([0, 0, 1, 1], [1, 1, 1, 0], 1.0, 1.1),
                                                  ([0, 0, 0, 1], [1, 0, 1, 1], 2.0, 2.4)]):
        for variant, sc, loss in (("plain", plain, lp), ("contrastive4", agl, la)):
            rows.append({"task": "arith", "seed": seed, "variant": variant, "task_loss": loss,
                         "refusal": float(np.mean(sc)), "overrefusal": 0.0, "scores": sc + [0, 0]})
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_summary(tmp_path, records)
    text = (tmp_path / "results.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| contrastive4 | 2 seeds |"))
    # refusal (75 + 75)/2; cost mean(+10 %, +20 %); pooled drift plain -(2+3)/8, agl -(1+1)/8 → 1 - 2/5 = 60 %
    assert "| 75.0 | 0.0 | 1.7500 | +15.0 % | 60.0 % [" in line


def test_fine_tune_changes_name_variants_and_fields_of_the_fine_tune():
    import dataclasses

    from agl_plugins.demo.benchmark import SPEC
    from agl_plugins.demo.train import FinetuneSpec

    fields = {f.name for f in dataclasses.fields(FinetuneSpec)}
    for name, change in SPEC.items():
        assert name in VARIANTS and set(change) <= fields and set(change) != {"seed"}


def test_the_demo_runs_the_benchmark_variant_coordinate_nt_which_is_the_library_default():
    from agl_core.config import AGLConfig

    from agl_plugins.demo.run import AGL, CONTRASTIVE, MASK

    mask, penalty = VARIANTS["coordinate-nt"]
    assert mask == MASK and penalty == AGL and not CONTRASTIVE and not mask.get("contrastive")
    assert AGLConfig(**MASK, **AGL) == AGLConfig()


def test_results_file_with_a_cut_row_keeps_every_whole_row(tmp_path, capsys):
    good = [{"task": "arith", "seed": s, "variant": "plain", "scores": [1, 0]} for s in (0, 1, 2)]
    cut = json.dumps({"task": "arith", "seed": 3, "variant": "plain", "scores": [1, 0]})[:30]
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(good[0]) + "\n" + "[1, 2]\n" + cut)  # a stray line, and a row cut by a crash
    assert _read(path) == [good[0]]
    assert "line(s) 2 are not result rows" in capsys.readouterr().out
    _append(path, good[1])  # the cut row is ended first: the new row keeps its own line
    _append(path, good[2])
    assert _read(path) == good
    assert path.read_text().splitlines()[2] == cut
