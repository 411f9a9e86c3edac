"""K-FAC eigen-bases of a mask: top eigenvectors of X and G, contrastive input bases, and the blocks."""

from __future__ import annotations

import hashlib
from typing import Mapping, Optional

import torch

from .blocks import KFACBlock, KFACStats
from .config import AGLConfig
from .safeio import update_hash

EPS64 = torch.finfo(torch.float64).eps


def _sym64(matrix: torch.Tensor) -> torch.Tensor:
    m = matrix.detach().to(device="cpu", dtype=torch.float64)
    return (m + m.T) / 2


def _fix_signs(vecs: torch.Tensor) -> torch.Tensor:
    """Flip each column so its largest-magnitude entry is positive: eigenvectors become deterministic."""
    if vecs.numel() == 0:
        return vecs
    rows = vecs.abs().argmax(dim=0)  # (k,)
    signs = torch.sign(vecs[rows, torch.arange(vecs.shape[1])])
    return vecs * torch.where(signs == 0, torch.ones_like(signs), signs)


def _clean(vals: torch.Tensor, matrix: torch.Tensor, eps: float = EPS64) -> torch.Tensor:
    """Clamp eigenvalues at ≥ 0; values below n·eps·trace(matrix) are round-off and count as 0.

    eps is the machine epsilon of the dtype the statistics were accumulated in (float32 for fp32/bf16 models).
    """
    tol = matrix.shape[0] * eps * float(matrix.diagonal().clamp(min=0).sum())
    return torch.where(vals > tol, vals, torch.zeros_like(vals))


def top_eigenpairs(matrix: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(vals (k,), vecs (n, k)) float64: the k largest eigenpairs of a symmetric PSD matrix, descending.

    k is clipped to n; eigenvalues clamp at ≥ 0.
    """
    m = _sym64(matrix)
    vals, vecs = torch.linalg.eigh(m)  # ascending
    k = min(k, m.shape[0])
    vals, vecs = vals.flip(0)[:k], vecs.flip(1)[:, :k]
    return _clean(vals, m, _eps(matrix)), _fix_signs(vecs)


def _eps(matrix: torch.Tensor) -> float:
    """Machine epsilon of the dtype `matrix` was accumulated in (float64 for non-float inputs)."""
    return torch.finfo(matrix.dtype).eps if matrix.is_floating_point() else EPS64


def contrastive_eigenpairs(
    x_align: torch.Tensor, x_ref: torch.Tensor, k: int, delta: float, name: str = "?"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lam (k,), V (n, k)) float64: the span of the top-k generalised eigenvectors of
    X_align v = θ (X_ref + δ·mean(diag X_ref)·I) v, orthonormalised, with X_align re-diagonalised inside it.

    V is orthonormal and lam[b] = V[:, b]ᵀ X_align V[:, b] (the alignment input energy), descending.
    """
    xa, xr = _sym64(x_align), _sym64(x_ref)
    n = xa.shape[0]
    scale = float(xr.diagonal().mean())
    if not scale > 0:
        raise ValueError(
            f"Reference covariance of module {name!r} is zero: the reference inputs never reached it. "
            "Check the reference data, or estimate without a reference (plain K-FAC basis)."
        )
    chol, info = torch.linalg.cholesky_ex(xr + delta * scale * torch.eye(n, dtype=torch.float64))
    if int(info) != 0:
        raise ValueError(
            f"Reference covariance of module {name!r} is not positive definite with contrastive_delta={delta}: "
            "raise contrastive_delta (e.g. 1e-3) or use more reference data."
        )
    # Whitening: M = L⁻¹ X_align L⁻ᵀ has eigenvectors w; generalised eigenvectors are v = L⁻ᵀ w.
    half = torch.linalg.solve_triangular(chol, xa, upper=False)  # (n, n) L⁻¹ X
    whitened = torch.linalg.solve_triangular(chol, half.T, upper=False)  # (n, n) L⁻¹ X L⁻ᵀ (symmetric)
    _, w = torch.linalg.eigh((whitened + whitened.T) / 2)  # ascending generalised eigenvalues θ
    k = min(k, n)
    gen = torch.linalg.solve_triangular(chol.T, w.flip(1)[:, :k], upper=True)  # (n, k) top-k v
    q, _ = torch.linalg.qr(gen)  # (n, k) orthonormal basis of their span
    lam, inner = torch.linalg.eigh(q.T @ xa @ q)  # (k,), (k, k) ascending
    vecs = _fix_signs(q @ inner.flip(1))  # (n, k)
    return _clean(lam.flip(0), xa, _eps(x_align)), vecs


def _check_stats(name: str, stats: object) -> tuple[int, int]:
    if not isinstance(stats, KFACStats):
        raise ValueError(
            f"basis=kfac needs KFACStats per module (from estimate_kfac); module {name!r} has "
            f"{type(stats).__name__}. A plain (out, in) Fisher tensor belongs to basis=coordinate."
        )
    x, g = stats.X, stats.G
    for label, mat in (("X", x), ("G", g)):
        if mat.dim() != 2 or mat.shape[0] != mat.shape[1] or not mat.is_floating_point():
            raise ValueError(f"KFACStats.{label} of module {name!r} must be a square float matrix, got {tuple(mat.shape)}.")
        if not bool(torch.isfinite(mat).all()):
            raise ValueError(f"KFACStats.{label} of module {name!r} has NaN/inf entries: re-estimate in float32.")
    return int(g.shape[0]), int(x.shape[0])


def _reference(reference: Optional[Mapping[str, torch.Tensor]], name: str, n_in: int) -> Optional[torch.Tensor]:
    if reference is None:
        return None
    if name not in reference:
        raise ValueError(
            f"The reference covariances lack module {name!r}; estimate them on the same target_modules as the mask."
        )
    ref = reference[name]
    if not isinstance(ref, torch.Tensor) or tuple(ref.shape) != (n_in, n_in):
        got = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
        raise ValueError(f"Reference covariance of module {name!r} must be ({n_in}, {n_in}), got {got}.")
    if not bool(torch.isfinite(ref).all()):
        raise ValueError(f"Reference covariance of module {name!r} has NaN/inf entries.")
    return ref


def _key(*mats: torch.Tensor) -> tuple:
    hasher = hashlib.sha256()
    for m in mats:
        update_hash(hasher, m.detach().to(torch.float64))
        hasher.update(repr(tuple(m.shape)).encode())
    return (hasher.hexdigest(),)


def _cached(cache: Optional[dict], key: tuple, compute):
    # q/k/v (and gate/up) projections of one layer see the same inputs: decompose each X once.
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def module_factors(
    name: str, stats: KFACStats, config: AGLConfig, ref: Optional[torch.Tensor], cache: Optional[dict] = None
):
    """(U or None, V, mu, lam) float64 for one module; `cache` shares decompositions of equal matrices."""
    x = stats.input_cov()
    if ref is None:
        lam, v = _cached(cache, ("x", config.k_in) + _key(x), lambda: top_eigenpairs(x, config.k_in))
    else:
        delta = config.contrastive_delta
        key = ("c", config.k_in, delta) + _key(x, ref)
        lam, v = _cached(cache, key, lambda: contrastive_eigenpairs(x, ref, config.k_in, delta, name))
    g = _sym64(stats.output_cov())
    if config.k_out != "all":
        mu, u = _cached(cache, ("g", config.k_out) + _key(g), lambda: top_eigenpairs(g, config.k_out))
        return u, v, mu, lam
    if config.kfac_out_weight == "ones":
        return None, v, torch.ones(g.shape[0], dtype=torch.float64), lam
    return None, v, g.diagonal().clamp(min=0).clone(), lam


def _positive_stats(mu: torch.Tensor, lam: torch.Tensor) -> tuple[float, int, float]:
    """(sum, count, min) of the positive entries of the block Fisher μ_a λ_b, without forming it."""
    mp, lp = mu[mu > 0].double(), lam[lam > 0].double()
    if not mp.numel() or not lp.numel():
        return 0.0, 0, float("inf")
    return float(mp.sum() * lp.sum()), mp.numel() * lp.numel(), float(mp.min() * lp.min())


def kfac_blocks(
    stats: Mapping[str, KFACStats], config: AGLConfig, reference: Optional[Mapping[str, torch.Tensor]] = None
) -> tuple[dict[str, KFACBlock], dict[str, list[int]]]:
    """(blocks, empty): one K-FAC eigen-block per module; modules whose block Fisher is all zero are `empty`."""
    if not isinstance(stats, Mapping) or not stats:
        raise ValueError("basis=kfac needs a non-empty dict of module name → KFACStats (from estimate_kfac).")
    parts, empty, cache = {}, {}, {}
    for name, st in stats.items():
        n_out, n_in = _check_stats(name, st)
        u, v, mu, lam = module_factors(name, st, config, _reference(reference, name, n_in), cache)
        f32 = [None if u is None else u.float(), v.float(), mu.float(), lam.float()]  # stored precision
        total, count, low = _positive_stats(f32[2], f32[3])
        if count == 0:
            empty[name] = [n_out, n_in]
        else:
            parts[name] = ((n_out, n_in), f32, total, count, low)
    if not parts:
        raise ValueError(
            "The K-FAC statistics are zero everywhere: the alignment data produced no gradient on the covered "
            "modules. Check that the targets (labels) are not all masked and that target_modules names real layers."
        )
    g_norm = sum(p[2] for p in parts.values()) / sum(p[3] for p in parts.values())
    g_kappa = min(p[4] for p in parts.values())
    blocks = {}
    for name, (shape, (u, v, mu, lam), total, count, low) in parts.items():
        norm, kappa = (g_norm, g_kappa) if config.budget == "global" else (total / count, low)
        blocks[name] = KFACBlock(shape, u, v, mu, lam, norm, kappa)
    return blocks, empty
