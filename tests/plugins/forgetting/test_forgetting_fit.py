"""The law fit: exact recovery, recovery under noise with covering bootstrap intervals, model choice, schedule."""

from __future__ import annotations

import numpy as np
import pytest
from agl_plugins.forgetting.analysis import FitOptions, analyse
from agl_plugins.forgetting.fit import aicc, fit_law, fit_many
from agl_plugins.forgetting.probe import log_schedule, summarize
from agl_plugins.forgetting.runs import Run
from synth import synth_nll

LAWS = [  # (A, β, E): growing, fast, slow with a jump, saturating (β < 0 with a plateau E)
    (0.05, 0.5, 0.0), (0.004, 1.1, 0.0), (0.2, 0.3, 0.1), (-0.3, -0.6, 0.4),
]


def brute_force(D, y, residual):
    """Dense float64 reference: β on a 1e-4 grid, (A, E) by numpy lstsq at each β."""
    best = (np.inf, None)
    for beta in np.arange(-2.0, 3.0 + 1e-9, 1e-4):
        X = np.stack([D ** beta] + ([np.ones_like(D)] if residual else []), axis=1)
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        sse = float(((X @ coef - y) ** 2).sum())
        if sse < best[0]:
            best = (sse, (coef[0], beta, coef[1] if residual else 0.0))
    return best


@pytest.mark.parametrize("A,beta,E", LAWS)
def test_exact_curves_are_recovered(A, beta, E):
    D = np.array(log_schedule(300, 12)[1:], dtype=float)
    fit, info = fit_law(D, 1.5 + A * D ** beta + E, 1.5, residual="on" if E else "off")
    assert (fit.A, fit.beta, fit.E) == pytest.approx((A, beta, E), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("residual", [False, True])
def test_fit_matches_a_brute_force_least_squares(residual):
    rng = np.random.default_rng(3)
    D = np.array(log_schedule(200, 10)[1:], dtype=float)
    y = 0.03 * D ** 0.45 + (0.05 if residual else 0.0) + rng.normal(0, 0.01, len(D))
    got = fit_many(D, y[None, :], residual)
    sse, (A, beta, E) = brute_force(D, y, residual)
    assert float(got["sse"][0]) <= sse * (1 + 1e-9) + 1e-15  # at least as good as the dense search
    assert (float(got["A"][0]), float(got["beta"][0]), float(got["E"][0])) == pytest.approx((A, beta, E), rel=2e-3,
                                                                                            abs=2e-4)


def run_of(steps, nll, labels, label="m"):
    return Run(path=f"{label}.jsonl", label=label, steps=np.asarray(steps), tokens=None, ids=[f"p{j}" for j in
               range(nll.shape[1])], labels=np.asarray(labels), nll=nll, agl_enabled=None)


@pytest.mark.parametrize("A,beta,E", LAWS)
def test_noisy_curves_recovered_and_intervals_cover_the_truth(A, beta, E):
    """10 noisy data sets per law: fits land near the truth and each 95 % interval holds it at least 8 times."""
    hits = {"A": 0, "beta": 0, "E": 0}
    for seed in range(10):
        steps, nll, labels = synth_nll(A, beta, E, prompts=60, noise=0.01, seed=seed)
        opts = FitOptions(residual="on" if E else "off", resamples=200, seed=seed)
        fit = analyse({"m": [run_of(steps, nll, labels)]}, opts)["methods"][0]["fit"]
        for name, true in (("A", A), ("beta", beta), ("E", E)):
            lo, hi = fit["ci"][name]
            hits[name] += lo <= true <= hi
            assert fit[name] == pytest.approx(true, rel=0.25, abs=0.02)
            assert hi - lo < max(0.5 * abs(true), 0.05), f"{name}: interval [{lo}, {hi}] too wide to mean anything"
    assert min(hits.values()) >= 8, hits


def test_interval_coverage_is_near_nominal():
    """Over 40 independent synthetic data sets, the 95 % intervals of A and β hold the truth ≥ 85 % of the time."""
    hits = {"A": 0, "beta": 0}
    trials = 40
    for seed in range(trials):
        steps, nll, labels = synth_nll(0.05, 0.4, prompts=40, noise=0.02, slope_spread=0.5, seed=100 + seed)
        fit = analyse({"m": [run_of(steps, nll, labels)]}, FitOptions(residual="off", resamples=200,
                                                                      seed=seed))["methods"][0]["fit"]
        hits["A"] += fit["ci"]["A"][0] <= 0.05 <= fit["ci"]["A"][1]
        hits["beta"] += fit["ci"]["beta"][0] <= 0.4 <= fit["ci"]["beta"][1]
    assert min(hits.values()) >= 0.85 * trials, hits


def test_aicc_keeps_E_only_when_the_data_need_it():
    D = np.array(log_schedule(500, 14)[1:], dtype=float)
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.003, len(D))
    with_e, info = fit_law(D, 2.0 + 0.02 * D ** 0.5 + 0.3 + noise, 2.0)
    assert with_e.residual and "kept" in info["rule"] and with_e.E == pytest.approx(0.3, abs=0.03)
    without, info = fit_law(D, 2.0 + 0.02 * D ** 0.5 + noise, 2.0)
    assert not without.residual and "dropped" in info["rule"] and info["aicc_with_E"] > info["aicc_without_E"]
    assert aicc(1.0, 4, 3) == float("inf")  # too few points for three parameters


def test_mean_curve_of_seeds_and_paired_differences():
    lora = [run_of(*synth_nll(0.05, 0.45, seed=s), label="lora") for s in range(3)]
    agl = [run_of(*synth_nll(0.05, 0.2, seed=10 + s), label="agl") for s in range(3)]
    out = analyse({"lora": lora, "agl": agl}, FitOptions(residual="off", resamples=200))
    methods = {m["label"]: m for m in out["methods"]}
    mean = np.mean([[summarize(r.labels, row)["nll"] for row in r.nll] for r in lora], axis=0)
    assert methods["lora"]["curve"] == pytest.approx(mean.tolist())  # mean of the seeds' group-averaged curves
    assert len(methods["lora"]["seeds"]) == 3 and methods["lora"]["seed_spread"]["beta"]["sd"] > 0
    (diff,) = out["comparisons"]
    assert diff["paired"] and diff["label"] == "agl" and diff["baseline"] == "lora"
    assert diff["beta"]["ci"][1] < 0 and diff["beta"]["value"] == pytest.approx(0.2 - 0.45, abs=0.05)
    assert diff["beta"]["value"] == pytest.approx(methods["agl"]["fit"]["beta"] - methods["lora"]["fit"]["beta"])


def test_extrapolation_from_the_first_half():
    steps, nll, labels = synth_nll(0.05, 0.4, noise=0.002, seed=4)
    m = analyse({"m": [run_of(steps, nll, labels)]}, FitOptions(residual="off", resamples=50,
                                                                extrapolate=True))["methods"][0]
    e = m["extrapolation"]
    assert (e["fit_points"], e["test_points"]) == (6, 5)
    assert e["rmse"] < 0.1 * e["naive_rmse"]  # the law beats "no further change" by far on law-shaped data
    obs = np.asarray(m["curve"])[7:]
    assert e["observed"] == pytest.approx(obs.tolist())
    assert e["rmse"] == pytest.approx(float(np.sqrt(np.mean((np.asarray(e["predicted"]) - obs) ** 2))))


@pytest.mark.parametrize("max_steps,points", [(1000, 12), (10, 12), (5, 4), (1, 5), (37, 2), (3000, 30)])
def test_log_schedule(max_steps, points):
    steps = log_schedule(max_steps, points)
    assert steps[0] == 0 and steps[-1] == max_steps
    assert len(steps) == min(points, max_steps + 1) and all(np.diff(steps) > 0)
    if max_steps >= 100 and points >= 10:  # log-spaced: the ratios between late neighbours are about equal
        ratios = np.asarray(steps[-4:]) / np.asarray(steps[-5:-1])
        assert ratios.max() / ratios.min() < 1.2


def test_log_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="points=1 is invalid"):
        log_schedule(10, 1)
    assert log_schedule(0, 12) == [0]
