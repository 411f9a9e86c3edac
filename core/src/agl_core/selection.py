"""Top-ρ coordinate support of a diagonal Fisher, exact and deterministic, without sorting every entry."""

from __future__ import annotations

import math
import warnings
from typing import Mapping, Optional

import torch

from .blocks import CoordinateBlock
from .config import AGLConfig

MAX_INDEX = 2**31  # CoordinateBlock.index is int32
SMALL = 1 << 16  # below this many entries a plain topk finds the threshold; above, a 1/64 sample guesses it


def protected_count(rho: float, numel: int) -> int:
    """k = ceil(ρ·n), with the float product rounded first so that e.g. 0.07·100 gives 7, not 8."""
    return max(1, math.ceil(round(rho * numel, 6)))


def check_fisher(fisher: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Validate a diagonal Fisher dict (name → (out, in) finite tensor ≥ 0); returns {name: flat view}."""
    if not isinstance(fisher, Mapping) or not fisher:
        raise ValueError("The Fisher must be a non-empty dict of module name → (out, in) tensor (from estimate_fisher).")
    flat = {}
    for name, value in fisher.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
            got = f"{type(value).__name__}" + (f" {tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor) else "")
            raise ValueError(
                f"Fisher of module {name!r} must be a 2-D float tensor (out, in), got {got}. "
                "basis=coordinate takes estimate_fisher's output; KFACStats belong to basis=kfac."
            )
        if value.numel() == 0:
            raise ValueError(f"Fisher of module {name!r} is empty (shape {tuple(value.shape)}); drop the module.")
        if value.numel() >= MAX_INDEX:
            raise ValueError(
                f"Module {name!r} has {value.numel()} weights (≥ 2³¹): too large for an int32 coordinate mask. "
                "Exclude it with AGLConfig.target_modules or use basis=kfac."
            )
        low, high = torch.aminmax(value)
        if not (bool(low >= 0) and bool(torch.isfinite(high))):
            raise ValueError(
                f"Fisher of module {name!r} has negative, NaN or infinite entries; a Fisher is a mean of squares "
                "and must be finite and ≥ 0. Re-estimate it (check for overflow: estimate in float32)."
            )
        flat[name] = value.detach().reshape(-1)
    return flat


def _guess_threshold(views: list[torch.Tensor], k: int, total: int, margin: float) -> float:
    """A value t with (usually) a little more than k entries ≥ t, from an evenly strided sample."""
    samples, size = [], min(total, max(SMALL, total // 64))
    for v in views:
        take = min(v.numel(), max(1, math.ceil(v.numel() * size / total)))
        stride = max(1, math.ceil(v.numel() / take))  # ≤ take elements spread over the whole view
        samples.append(v[::stride].float())
    sample = torch.cat(samples)  # (≈ total / 64,)
    expect = k / total * sample.numel()
    want = min(sample.numel(), math.ceil(margin * (expect + 4 * math.sqrt(expect) + 16)))
    return float(torch.topk(sample, want).values[-1])


def _threshold(views: list[torch.Tensor], k: int) -> float:
    """The exact k-th largest value over all views (k ≤ number of positive entries)."""
    total = sum(v.numel() for v in views)
    if len(views) == 1 and total <= SMALL:
        return float(torch.topk(views[0], k).values[-1])
    for margin in (1.2, 2.0, 8.0):
        guess = _guess_threshold(views, k, total, margin)
        if guess <= 0:
            break
        cand = torch.cat([v[v >= guess] for v in views])  # (≈ margin·k,) in the views' dtype
        if cand.numel() >= k:
            return float(torch.topk(cand, k).values[-1])  # exact: a value of the views
    cand = torch.cat([v[v > 0] for v in views])  # fallback: every positive entry is a candidate
    return float(torch.topk(cand, k).values[-1])


def select_top(views: list[torch.Tensor], k: int, positives: Optional[int] = None) -> list[torch.Tensor]:
    """Flat indices (int64, sorted) per view of the k largest positive entries over all views together.

    Ties at the threshold go to earlier views first, then to lower flat index: deterministic.
    If fewer than k entries are positive, all positive entries are returned. `positives`: their count, if known.
    """
    if positives is None:
        positives = sum(int((v > 0).sum()) for v in views)
    k = min(k, positives)
    if k == 0:
        return [torch.empty(0, dtype=torch.int64, device=v.device) for v in views]
    t = _threshold(views, k)
    at_least = [torch.nonzero(v >= t).flatten() for v in views]  # (≥ |S_l|,) ascending flat indices
    above = [idx[v[idx] > t] for v, idx in zip(views, at_least)]
    left = k - sum(a.numel() for a in above)
    chosen = []
    for v, a, idx in zip(views, above, at_least):
        ties = idx[v[idx] == t][: max(left, 0)]
        left -= ties.numel()
        chosen.append(torch.sort(torch.cat([a, ties])).values)
    return chosen


def _stats(values: list[torch.Tensor]) -> tuple[float, float]:
    """(mean, min) over the concatenation of non-empty float tensors, in float64."""
    count = sum(v.numel() for v in values)
    total = sum(float(v.double().sum()) for v in values)
    return total / count, min(float(v.min()) for v in values if v.numel())


def coordinate_blocks(
    fisher: Mapping[str, torch.Tensor], config: AGLConfig
) -> tuple[dict[str, CoordinateBlock], dict[str, list[int]]]:
    """(blocks, empty): the top-ρ support per module; `empty` lists covered modules left with no coordinate."""
    flat = check_fisher(fisher)
    names = list(flat)
    order = sorted(names)  # tie order: module name, then flat index
    views = [flat[n] for n in order]
    positives = [int((v > 0).sum()) for v in views]
    if not any(positives):
        raise ValueError(
            "The Fisher is zero everywhere: the alignment data produced no gradient on the covered modules. "
            "Check that the targets (labels) are not all masked and that target_modules names real linear layers."
        )
    if config.budget == "global":
        k = protected_count(config.rho, sum(v.numel() for v in views))
        picked = dict(zip(order, select_top(views, k, sum(positives))))
        _warn_short(sum(p.numel() for p in picked.values()), k, "all modules")
    else:
        picked = {}
        for name, v, pos in zip(order, views, positives):
            k = protected_count(config.rho, v.numel())
            picked[name] = select_top([v], k, pos)[0]
            _warn_short(picked[name].numel(), k, f"module {name!r}")
    return _make_blocks(fisher, flat, picked, names, config.budget)


def _warn_short(got: int, k: int, where: str) -> None:
    if 0 < got < k:
        warnings.warn(
            f"Only {got} Fisher entries are positive in {where}, fewer than the {k} that ρ asks for: "
            "the support holds just those (zeros are never protected). Use more alignment data or a smaller rho.",
            stacklevel=4,
        )


def _make_blocks(
    fisher: Mapping[str, torch.Tensor],
    flat: dict[str, torch.Tensor],
    picked: dict[str, torch.Tensor],
    names: list[str],
    budget: str,
) -> tuple[dict[str, CoordinateBlock], dict[str, list[int]]]:
    values = {n: flat[n][picked[n]].float() for n in names}  # (|S_l|,) float32 each
    nonempty = [n for n in names if picked[n].numel()]
    if budget == "global":
        g_norm, g_kappa = _stats([values[n] for n in nonempty])
    blocks, empty = {}, {}
    for n in names:
        shape = (int(fisher[n].shape[0]), int(fisher[n].shape[1]))
        if not picked[n].numel():
            empty[n] = list(shape)
            continue
        norm, kappa = (g_norm, g_kappa) if budget == "global" else _stats([values[n]])
        index = picked[n].to(torch.int32).cpu()  # (|S_l|,) sorted flat row-major indices
        blocks[n] = CoordinateBlock(shape, index, values[n].cpu(), norm, kappa)
    return blocks, empty
