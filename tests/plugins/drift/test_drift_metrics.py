"""Rates, bootstrap intervals, drift and drift reduction on known data (NumPy float64 reference arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest

from agl_plugins.drift import Bootstrap, compute_tables
from agl_plugins.drift.stats import ratio_reduction, resampled_means


def rows_for(model: str, judge: str, scores, labels, values=None, cats=None):
    out = []
    for i, s in enumerate(scores):
        out.append({"model": model, "judge": judge, "id": f"p{i}", "label": labels[i],
                    "category": (cats or ["c"] * len(scores))[i], "score": float(s),
                    "value": None if values is None else float(values[i]), "response": None})
    return out


def find(entries, **match):
    hits = [e for e in entries if all(e.get(k) == v for k, v in match.items())]
    assert len(hits) == 1, (match, hits)
    return hits[0]


def test_rate_interval_contains_the_rate_and_shrinks_with_n():
    widths = []
    for n in (20, 80, 320):
        scores = (np.arange(n) % 10 < 3).astype(float)  # rate exactly 0.3
        tables, _ = compute_tables(rows_for("base", "j", scores, ["unsafe"] * n), ["base"], [("j", "generation")])
        e = find(tables.metrics, metric="refusal_rate", category=None)
        assert e["value"] == pytest.approx(0.3) and e["n"] == n
        assert e["ci_low"] < 0.3 < e["ci_high"]
        widths.append(e["ci_high"] - e["ci_low"])
        binomial = 2 * 1.96 * np.sqrt(0.3 * 0.7 / n)  # the normal-approximation width it should be close to
        assert widths[-1] == pytest.approx(binomial, rel=0.2)
    assert widths[0] > widths[1] > widths[2]


def test_bootstrap_is_deterministic_and_seeded():
    scores = np.random.default_rng(1).integers(0, 2, 50)
    rows = rows_for("base", "j", scores, ["unsafe"] * 50)
    a, _ = compute_tables(rows, ["base"], [("j", "generation")], boot=Bootstrap(seed=0))
    b, _ = compute_tables(rows, ["base"], [("j", "generation")], boot=Bootstrap(seed=0))
    c, _ = compute_tables(rows, ["base"], [("j", "generation")], boot=Bootstrap(seed=1))
    assert a.metrics == b.metrics and a.metrics != c.metrics
    with pytest.raises(ValueError, match="resamples=3 is invalid"):
        Bootstrap(resamples=3)
    with pytest.raises(ValueError, match="confidence=1.5 is invalid"):
        Bootstrap(confidence=1.5)


def test_drift_and_drift_reduction_arithmetic_with_paired_intervals():
    n = 40
    labels = ["unsafe"] * 30 + ["safe"] * 10
    base = np.r_[np.ones(30), np.zeros(10)]           # refuses every unsafe prompt, no over-refusal
    agl = np.r_[np.ones(24), np.zeros(6), np.zeros(10)]   # 0.8 on unsafe
    plain = np.r_[np.ones(6), np.zeros(24), np.ones(2), np.zeros(8)]  # 0.2 on unsafe, 0.2 over-refusal
    rows = [r for m, s in (("base", base), ("agl", agl), ("plain", plain)) for r in rows_for(m, "j", s, labels)]
    tables, _ = compute_tables(rows, ["base", "agl", "plain"], [("j", "generation")],
                               compare={"agl": "agl", "plain": "plain"})
    d_agl = find(tables.drift, model="agl", metric="refusal_rate", category=None)
    d_plain = find(tables.drift, model="plain", metric="refusal_rate", category=None)
    assert d_agl["value"] == pytest.approx(-0.2) and d_plain["value"] == pytest.approx(-0.8)
    assert d_agl["ci_low"] <= -0.2 <= d_agl["ci_high"] and d_agl["ci_high"] < 0
    red = find(tables.drift_reduction, metric="refusal_rate")
    assert red["value"] == pytest.approx(1 - 0.2 / 0.8) and red["undefined_resamples"] == 0
    assert red["ci_low"] < 0.75 < red["ci_high"] and red["agl"] == "agl" and red["judge"] == "j"
    over = find(tables.drift_reduction, metric="over_refusal_rate")
    assert over["value"] == pytest.approx(1.0) and over["drift_plain"] == pytest.approx(0.2)
    assert n == len(labels)


def test_paired_resampling_matches_a_direct_computation():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 25))
    draws = Bootstrap().draws(25, "g")
    means = resampled_means(x, draws)  # (3, R)
    for r in (0, 17, 999):
        assert means[:, r] == pytest.approx(x[:, draws[r]].mean(axis=1), rel=1e-12)
    assert (Bootstrap().draws(25, "g") == draws).all() and not (Bootstrap().draws(25, "h") == draws).all()


def test_margins_categories_and_undefined_reduction():
    labels = ["unsafe"] * 6
    cats = ["a", "a", "a", "b", "b", "b"]
    vals = {"base": [2, 2, 2, 1, 1, 1], "agl": [1, 1, 1, 1, 1, 1], "plain": [0, 0, 0, 1, 1, 1]}
    rows = [r for m, v in vals.items() for r in rows_for(m, "margin", np.ones(6), labels, values=v, cats=cats)]
    tables, datas = compute_tables(rows, list(vals), [("margin", "model")], compare={"agl": "agl", "plain": "plain"})
    assert find(tables.metrics, model="base", metric="mean_margin_unsafe", category=None)["value"] == pytest.approx(1.5)
    assert find(tables.metrics, model="plain", metric="mean_margin_unsafe", category="a")["value"] == 0.0
    cat_b = find(tables.drift, model="plain", metric="mean_margin_unsafe", category="b")
    assert cat_b["value"] == 0.0 and cat_b["ci_low"] == cat_b["ci_high"] == 0.0
    margin_red = find(tables.drift_reduction, metric="mean_margin_unsafe")
    assert margin_red["value"] == pytest.approx(1 - 0.5 / 1.0)
    rate_red = find(tables.drift_reduction, metric="refusal_rate")  # every model refuses everything: no drift
    assert rate_red["value"] is None and rate_red["ci_low"] is None and rate_red["undefined_resamples"] == 1000
    assert ratio_reduction(0.1, 0.0) is None and datas[0].missing == 0


def test_prompts_missing_for_one_model_are_left_out_and_roles_are_checked():
    rows = rows_for("base", "j", [1, 0, 1], ["unsafe"] * 3) + rows_for("ft", "j", [1, 0], ["unsafe"] * 2)
    tables, datas = compute_tables(rows, ["base", "ft"], [("j", "generation")])
    assert datas[0].missing == 1 and find(tables.metrics, model="base", category=None)["n"] == 2
    with pytest.raises(ValueError, match="--reference 'nope' is not an evaluated model"):
        compute_tables(rows, ["base", "ft"], [("j", "generation")], reference="nope")
    with pytest.raises(ValueError, match="--compare agl='x' is not an evaluated model"):
        compute_tables(rows, ["base", "ft"], [("j", "generation")], compare={"agl": "x", "plain": "ft"})
    with pytest.raises(ValueError, match="is the reference model"):
        compute_tables(rows, ["base", "ft"], [("j", "generation")], compare={"agl": "base", "plain": "ft"})
    with pytest.raises(ValueError, match="name the same model"):
        compute_tables(rows, ["base", "ft"], [("j", "generation")], compare={"agl": "ft", "plain": "ft"})
