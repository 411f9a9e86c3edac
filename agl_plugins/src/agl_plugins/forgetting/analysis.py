"""Per-label forgetting laws: fits of mean and per-seed curves, bootstrap over prompts, extrapolation, comparisons."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .fit import fit_law, fit_many
from .runs import LOSSES, X_AXES, Run, common_grid

PARAMS = ("A", "beta", "E", "excess_end")


@dataclass(frozen=True)
class FitOptions:
    """How curves are fitted: which loss, which x axis, the residual rule, the bootstrap, extrapolation."""

    loss: str = "mean"
    x: str = "steps"
    residual: str = "auto"
    resamples: int = 1000
    seed: int = 0
    confidence: float = 0.95
    extrapolate: bool = False

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"--loss {self.loss!r} is invalid: use one of {list(LOSSES)}.")
        if self.x not in X_AXES:
            raise ValueError(f"--x {self.x!r} is invalid: use one of {list(X_AXES)}.")
        if not isinstance(self.resamples, int) or self.resamples < 10:
            raise ValueError(f"--resamples {self.resamples!r} is invalid: use an integer ≥ 10 (1000 is usual).")
        if not 0.5 <= self.confidence < 1.0:
            raise ValueError(f"confidence={self.confidence!r} is invalid: use a value in [0.5, 1), e.g. 0.95.")


def draws(groups: list[np.ndarray], opts: FitOptions) -> list[np.ndarray]:
    """(resamples, n_g) positions per group, resampled with replacement; the same for every run and label whose
    groups have the same sizes (the size and group order seed them), so comparisons are paired over prompts."""
    out = []
    for k, idx in enumerate(groups):
        salt = int(hashlib.sha256(f"{k}:{idx.size}".encode()).hexdigest()[:8], 16)
        rng = np.random.default_rng([opts.seed, salt])
        out.append(rng.integers(0, idx.size, size=(opts.resamples, idx.size)))
    return out


def curve(run: Run, rows: np.ndarray, loss: str, picks: Optional[list[np.ndarray]] = None) -> np.ndarray:
    """The alignment loss at the measurements `rows`: mean over groups of the group's mean prompt NLL.

    Without `picks`: (S,). With bootstrap picks (one (R, n_g) array per group): (R, S).
    """
    nll = run.nll[rows]  # (S, P)
    groups = run.groups(loss)
    if picks is None:
        return np.mean([nll[:, idx].mean(axis=1) for idx in groups], axis=0)
    per_group = [nll[:, idx[pick]].mean(axis=-1).T for idx, pick in zip(groups, picks)]  # each (R, S)
    return np.mean(per_group, axis=0)


def interval(samples: np.ndarray, confidence: float) -> list[Optional[float]]:
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return [None, None]
    tail = (1.0 - confidence) / 2.0
    return [float(v) for v in np.quantile(finite, [tail, 1.0 - tail])]


def _boot(D: np.ndarray, curves: np.ndarray, residual: bool) -> dict[str, np.ndarray]:
    """Fits of every resampled curve (R, S) at D (S,) with the residual flag of the point fit."""
    got = fit_many(D[1:], curves[:, 1:] - curves[:, :1], residual)
    got["excess_end"] = got["A"] * D[-1] ** got["beta"] + got["E"]
    return got


def _fit_entry(D: np.ndarray, L: np.ndarray, boot: dict[str, np.ndarray], residual: str, opts: FitOptions) -> dict:
    fit, info = fit_law(D[1:], L[1:], float(L[0]), residual)
    entry = {"L0": float(L[0]), **fit.to_dict(), "selection": info,
             "excess_end": fit.A * D[-1] ** fit.beta + fit.E}
    entry["ci"] = {p: interval(boot[p], opts.confidence) for p in PARAMS} if boot else None
    return entry


def extrapolation(D: np.ndarray, L: np.ndarray, opts: FitOptions) -> dict[str, Any]:
    """Fit on the first half of the points after step 0, predict the second half; errors in nats."""
    n = len(D) - 1
    head = math.ceil(n / 2)
    need = 4 if opts.residual == "on" else 3  # the parameters of the half-fit, plus one
    if head < need or n - head < 1:
        raise ValueError(f"--extrapolate needs at least {2 * need - 1} measurements after step 0 (this curve has {n}): "
                         f"the first half must hold {need} to fit the law, the second at least 1 to test it. Raise "
                         "forgetting_points.")
    fit, info = fit_law(D[1:1 + head], L[1:1 + head], float(L[0]), opts.residual)
    pred = fit.predict(D[1 + head:], float(L[0]))
    obs = L[1 + head:]
    err = pred - obs
    hold = obs - L[head]  # naive forecast: the last fitted point's loss stays
    excess_obs = obs[-1] - L[0]
    return {"fit_points": head, "test_points": int(n - head), "fit": fit.to_dict(), "selection": info,
            "test_steps": D[1 + head:].tolist(), "predicted": pred.tolist(), "observed": obs.tolist(),
            "rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err))),
            "max_abs": float(np.max(np.abs(err))),
            "rel_excess_error_end": float(abs(err[-1]) / abs(excess_obs)) if excess_obs != 0 else None,
            "naive_rmse": float(np.sqrt(np.mean(hold ** 2)))}


def analyse_label(runs: list[Run], opts: FitOptions) -> dict[str, Any]:
    """Fits of one method: its mean curve (with bootstrap intervals) and every run (seed) on its own."""
    steps, D, rows = common_grid(runs, opts.x)
    picks = draws(runs[0].groups(opts.loss), opts)
    per_run = [curve(run, r, opts.loss) for run, r in zip(runs, rows)]
    mean = np.mean(per_run, axis=0)
    boot_curves = np.mean([curve(run, r, opts.loss, picks) for run, r in zip(runs, rows)], axis=0)  # (R, S)
    point, _ = fit_law(D[1:], mean[1:], float(mean[0]), opts.residual)
    boot = _boot(D, boot_curves, point.residual)
    main = _fit_entry(D, mean, boot, opts.residual, opts)
    flag = "on" if point.residual else "off"
    seeds = []
    for run, r, c in zip(runs, rows, per_run):
        run_boot = _boot(D, curve(run, r, opts.loss, picks), point.residual)
        seeds.append({"path": run.path, "agl_enabled": run.agl_enabled, "curve": c.tolist(),
                      **_fit_entry(D, c, run_boot, flag, opts)})
    out = {"label": runs[0].label, "runs": len(runs), "steps": steps.tolist(), "D": D.tolist(),
           "prompts": {g: int((runs[0].labels == g).sum()) for g in ("unsafe", "safe")},
           "agl_enabled": sorted({str(r.agl_enabled) for r in runs}), "curve": mean.tolist(),
           "curve_ci": [interval(boot_curves[:, i], opts.confidence) for i in range(len(D))], "fit": main,
           "seeds": seeds, "seed_spread": _spread(seeds) if len(seeds) > 1 else None}
    if opts.extrapolate:
        out["extrapolation"] = extrapolation(D, mean, opts)
        for seed, c in zip(seeds, per_run):
            seed["extrapolation"] = extrapolation(D, np.asarray(c), opts)
    out["_boot"] = boot
    out["_ids"] = runs[0].ids
    return out


def _spread(seeds: list[dict]) -> dict[str, dict[str, float]]:
    return {p: {"mean": float(np.mean([s[p] for s in seeds])), "sd": float(np.std([s[p] for s in seeds], ddof=1))}
            for p in PARAMS}


def compare(base: dict, other: dict, opts: FitOptions) -> dict[str, Any]:
    """other − base for A, β, E and the excess at the last step, with bootstrap intervals (paired when both
    labels measured the same prompts)."""
    paired = base["_ids"] == other["_ids"]
    out = {"label": other["label"], "baseline": base["label"], "paired": paired}
    for p in PARAMS:
        diff = other["_boot"][p] - base["_boot"][p]
        out[p] = {"value": other["fit"][p] - base["fit"][p], "ci": interval(diff, opts.confidence)}
    if base["D"][-1] != other["D"][-1]:
        out["note"] = "the labels end at different steps: excess_end differences compare different points"
    return out


def analyse(grouped: dict[str, list[Run]], opts: FitOptions, baseline: Optional[str] = None) -> dict[str, Any]:
    """Every label's fits and the comparisons of each label against `baseline` (default: the first label)."""
    labels = list(grouped)
    baseline = baseline or labels[0]
    if baseline not in grouped:
        raise ValueError(f"--baseline {baseline!r} is not one of the labels {labels}.")
    methods = {label: analyse_label(runs, opts) for label, runs in grouped.items()}
    comparisons = [compare(methods[baseline], methods[label], opts) for label in labels if label != baseline]
    for m in methods.values():
        m.pop("_boot")
        m.pop("_ids")
    return {"methods": list(methods.values()), "baseline": baseline, "comparisons": comparisons}
