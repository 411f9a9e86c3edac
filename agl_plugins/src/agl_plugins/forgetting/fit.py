"""Least-squares fits of the forgetting law L(D) = L0 + A·D^β (+ E): β profile grid + golden refine, AICc choice."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

BETA_LO, BETA_HI = -2.0, 3.0
GRID = 1001  # β grid step 0.005
GOLDEN_ITERS = 40
RESIDUAL_MODES = ("auto", "on", "off")
_TINY = 1e-300


@dataclass
class LawFit:
    """One fitted law on D > 0: excess y = L − L0 ≈ A·D^β + E (E = 0 when the residual term is off)."""

    A: float
    beta: float
    E: float
    residual: bool
    sse: float
    n: int
    aicc: float

    @property
    def k(self) -> int:
        return 3 if self.residual else 2

    def predict(self, D: np.ndarray, L0: float) -> np.ndarray:
        return L0 + self.A * np.asarray(D, dtype=np.float64) ** self.beta + self.E

    def to_dict(self) -> dict:
        out = asdict(self)
        out["aicc"] = _finite(self.aicc)
        out["rmse"] = math.sqrt(self.sse / self.n) if self.n else None
        return out


def aicc(sse: float, n: int, k: int) -> float:
    """Small-sample AIC of a Gaussian least-squares fit with k parameters (inf when n ≤ k + 1)."""
    if n <= k + 1:
        return math.inf
    return n * math.log(max(sse / n, _TINY)) + 2 * k + 2 * k * (k + 1) / (n - k - 1)


def _linear(x: np.ndarray, y: np.ndarray, residual: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closed-form least squares of y ≈ a·x (+ e) along the last axis; x, y broadcast to (..., n).

    Returns (a, e, sse), each of shape (...).
    """
    if not residual:
        sxx = (x * x).sum(-1)
        a = np.where(sxx > 0, (x * y).sum(-1) / np.where(sxx > 0, sxx, 1.0), 0.0)
        e = np.zeros_like(a)
    else:
        xm, ym = x.mean(-1, keepdims=True), y.mean(-1, keepdims=True)
        sxx = ((x - xm) ** 2).sum(-1)
        ok = sxx > 1e-12 * np.maximum((x * x).sum(-1), _TINY)  # x constant (β ≈ 0): a and e are not separable
        a = np.where(ok, ((x - xm) * (y - ym)).sum(-1) / np.where(ok, sxx, 1.0), 0.0)
        e = ym[..., 0] - a * xm[..., 0]
    resid = y - a[..., None] * x - e[..., None]
    return a, e, (resid * resid).sum(-1)


def _profile(d: np.ndarray, y: np.ndarray, beta: np.ndarray, residual: bool) -> tuple:
    """(a, e, sse) for y (R, n) at one β per row (R,), with d = D / D_max (n,)."""
    x = d[None, :] ** beta[:, None]
    return _linear(x, y, residual)


def fit_many(D: np.ndarray, Y: np.ndarray, residual: bool) -> dict[str, np.ndarray]:
    """Fit y ≈ A·D^β (+ E) to each row of Y (R, n) at the points D (n,), all > 0.

    β is found on a grid over [BETA_LO, BETA_HI] of the profile SSE (A, E closed-form at each β), then refined
    by golden-section search between the best grid point's neighbours. Returns arrays A, beta, E, sse (R,).
    """
    D = np.asarray(D, dtype=np.float64)
    Y = np.atleast_2d(np.asarray(Y, dtype=np.float64))
    scale = float(D.max())
    d = D / scale  # in (0, 1]: D^β stays finite for every β on the grid
    grid = np.linspace(BETA_LO, BETA_HI, GRID)
    best = np.argmin(_grid_sse(d, Y, grid, residual), axis=1)
    step = grid[1] - grid[0]
    left = np.clip(grid[best] - step, BETA_LO, BETA_HI)
    right = np.clip(grid[best] + step, BETA_LO, BETA_HI)
    beta = _golden(d, Y, left, right, residual)
    a, e, sse = _profile(d, Y, beta, residual)
    return {"A": a * scale ** (-beta), "beta": beta, "E": e, "sse": sse}


def _grid_sse(d: np.ndarray, Y: np.ndarray, grid: np.ndarray, residual: bool) -> np.ndarray:
    """Profile SSE (R, G) of every row of Y (R, n) at every β of the grid, from sufficient statistics (matmuls)."""
    x = d[None, :] ** grid[:, None]  # (G, n)
    if residual:
        x = x - x.mean(axis=1, keepdims=True)
        Y = Y - Y.mean(axis=1, keepdims=True)
    sxx = (x * x).sum(axis=1)  # (G,)
    sxy = Y @ x.T  # (R, G)
    explained = np.where(sxx > 1e-300, sxy * sxy / np.where(sxx > 1e-300, sxx, 1.0), 0.0)
    return (Y * Y).sum(axis=1, keepdims=True) - explained


def _golden(d: np.ndarray, Y: np.ndarray, left: np.ndarray, right: np.ndarray, residual: bool) -> np.ndarray:
    """Per row, the β in [left, right] minimising the profile SSE (golden-section search, vectorised)."""
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    lo, hi = left.copy(), right.copy()
    c, e = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fe = _profile(d, Y, c, residual)[2], _profile(d, Y, e, residual)[2]
    for _ in range(GOLDEN_ITERS):
        go_left = fc < fe
        hi = np.where(go_left, e, hi)
        lo = np.where(go_left, lo, c)
        c_new, e_new = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        fc_new, fe_new = _profile(d, Y, c_new, residual)[2], _profile(d, Y, e_new, residual)[2]
        c, e, fc, fe = c_new, e_new, fc_new, fe_new
    return (lo + hi) / 2.0


def fit_law(D: np.ndarray, L: np.ndarray, L0: float, residual: str = "auto") -> tuple[LawFit, dict]:
    """The law fitted to the curve L at steps D (all > 0), L0 = the loss at D = 0.

    residual: 'on' (fit E), 'off' (E = 0) or 'auto' (keep E when it lowers AICc). Returns the chosen fit and
    {'aicc_with_E', 'aicc_without_E', 'rule'} saying how E was decided.
    """
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual={residual!r} is invalid: use one of {list(RESIDUAL_MODES)}.")
    D = np.asarray(D, dtype=np.float64)
    y = np.asarray(L, dtype=np.float64) - float(L0)
    check_points(D, y, need=3 if residual != "on" else 4)
    fits = {}
    for flag in (False, True):
        if flag and len(D) < 4:
            continue
        got = fit_many(D, y[None, :], flag)
        sse = float(got["sse"][0])
        fits[flag] = LawFit(A=float(got["A"][0]), beta=float(got["beta"][0]), E=float(got["E"][0]), residual=flag,
                            sse=sse, n=len(D), aicc=aicc(sse, len(D), 3 if flag else 2))
    a_with = fits[True].aicc if True in fits else math.inf
    a_without = fits[False].aicc
    if residual == "auto":
        chosen = True if a_with < a_without else False
        rule = "AICc (E kept: lower AICc)" if chosen else "AICc (E dropped: it does not lower AICc)"
    else:
        chosen, rule = residual == "on", f"--residual {residual}"
    info = {"aicc_with_E": _finite(a_with), "aicc_without_E": _finite(a_without), "rule": rule}
    return fits[chosen], info


def check_points(D: np.ndarray, y: np.ndarray, need: int) -> None:
    """ValueError unless there are ≥ `need` finite points with D > 0 in increasing order."""
    if len(D) < need:
        raise ValueError(f"Only {len(D)} measurement(s) after step 0; fitting the law needs at least {need}: raise "
                         "forgetting_points (e.g. 12) or train for more steps.")
    if not (np.all(np.isfinite(D)) and np.all(D > 0) and np.all(np.diff(D) > 0)):
        raise ValueError("The steps (or tokens) of the measurements must be positive and strictly increasing.")
    if not np.all(np.isfinite(y)):
        raise ValueError("Some measured losses are not finite (NaN or inf); check the run's agl_forgetting.jsonl.")


def _finite(value: float) -> Optional[float]:
    return float(value) if math.isfinite(value) else None
