"""AGLPenalty: the AGL (reconstructed) regulariser on a model's LoRA updates, from a FisherMask."""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import torch
from torch import nn

from .binding import BoundModule, bind_targets, empty_block
from .config import AGLConfig
from .fused import CPU_CHUNK, DEFAULT_CHUNK, FusedCoordinates
from .fused_kfac import FusedKFAC, kfac_key
from .mask import EMPTY_KEY

logger = logging.getLogger(__name__)

TERMS = ("L_A", "L_T", "E_rie", "E_geo")


class ModuleTerms(NamedTuple):
    """One module's terms (0-dim tensors); the last three are detached diagnostics."""

    L_A: torch.Tensor
    L_T: torch.Tensor
    E_rie: torch.Tensor
    E_geo: torch.Tensor
    on_support: torch.Tensor  # Σ_S ΔW_j² (or Σ C²): energy of ΔW on the protected block
    dw_sq: torch.Tensor  # ‖ΔW‖²_F
    max_abs_dw_s: torch.Tensor  # max_S |ΔW_j| (or max |C|), 0 on an empty block


@dataclass
class PenaltyResult:
    """What one AGLPenalty call returns: unweighted term sums, the weighted total and diagnostics."""

    total: torch.Tensor  # scale · (λ_A ΣL_A + λ_T ΣL_T + λ_NC Σ[α E_rie + (1−α) E_geo]); 0 when disabled
    L_A: torch.Tensor
    L_T: torch.Tensor
    E_rie: torch.Tensor
    E_geo: torch.Tensor
    lambda_scale: float
    protected_share: torch.Tensor  # Σ energy on S / Σ ‖ΔW‖²_F (detached; 0 when ΔW = 0)
    max_abs_dw_s: torch.Tensor  # largest |ΔW| on S, or |C| for kfac (detached)
    per_module: Optional[dict[str, dict[str, float]]] = field(default=None)

    def metrics(self) -> dict[str, float]:
        """Python floats for loggers (one device sync)."""
        values = torch.stack([
            self.total.detach(), self.L_A.detach(), self.L_T.detach(), self.E_rie.detach(),
            self.E_geo.detach(), self.protected_share.detach(),
        ]).double().cpu().tolist()
        keys = ("agl/penalty", "agl/L_A", "agl/L_T", "agl/E_rie", "agl/E_geo", "agl/protected_share")
        out = dict(zip(keys, values))
        out["agl/lambda_scale"] = float(self.lambda_scale)
        return out


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class AGLPenalty:
    """Binds a FisherMask to a model's trainable LoRA adapters once; each call returns a PenaltyResult.

    `config` defaults to the mask's config. The mask's base-model fingerprint is checked against `model`
    (check_fingerprint=False skips it, e.g. for synthetic masks). Tensors of the mask are cached on the LoRA weights' device
    (re-cached if the model moves). fp16/bf16 LoRA weights are computed in float32. Coordinate-basis
    modules are evaluated together, one fused group per device/dtype/rank (agl_core.fused), in chunks of
    `chunk_size` protected coordinates (None: 2¹⁸ on a CPU, 2²⁰ on a GPU); K-FAC-basis modules in one batched group per device/dtype/rank/shape
    (agl_core.fused_kfac).
    """

    def __init__(self, model: nn.Module, mask: Any, config: Optional[AGLConfig] = None, *,
                 chunk_size: Optional[int] = None, check_fingerprint: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module (a PEFT LoRA model), got {type(model).__name__}.")
        if not isinstance(getattr(mask, "blocks", None), dict):
            raise ValueError(
                f"mask must be a FisherMask (with a .blocks dict), got {type(mask).__name__}; build one with "
                "FisherMask.from_fisher(...) or load one with FisherMask.load(path)."
            )
        config = mask.config if config is None else config
        if not isinstance(config, AGLConfig):
            raise ValueError(f"config must be an AGLConfig, got {type(config).__name__}.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                       or chunk_size < 1):
            raise ValueError(
                f"chunk_size={chunk_size!r} is invalid: must be an integer ≥ 1, or None for the default "
                f"({CPU_CHUNK} on a CPU, {DEFAULT_CHUNK} on a GPU)."
            )
        self.config, self.mask, self.chunk_size = config, mask, chunk_size
        _warn_mask_settings(config, getattr(mask, "config", None))
        if check_fingerprint and callable(getattr(mask, "check_model", None)):
            mask.check_model(model)  # refuses a mask estimated on another base model
        self._bound, self.unmatched_mask_modules = bind_targets(model, _covered_blocks(mask), config)
        self._group_keys: Optional[tuple] = None
        self._group_cache: list[tuple[list[int], Any]] = []
        if self.unmatched_mask_modules:
            names = self.unmatched_mask_modules
            logger.warning(
                "AGL mask covers %d module(s) with no trainable LoRA adapter (e.g. %s); they are not penalised.",
                len(names), ", ".join(names[:5]),
            )

    @property
    def modules(self) -> list[str]:
        """Keys of the penalised (module, adapter) pairs, in model order."""
        return [b.key for b in self._bound]

    @property
    def num_protected(self) -> int:
        """Total |S| over the penalised modules."""
        return sum(b.size for b in self._bound)

    def __call__(self, step: Optional[int] = None, per_module: bool = False) -> PenaltyResult:
        scale = self._scale(step)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.enabled):
            sums, table = self._evaluate(per_module)  # 0-dim sums of every ModuleTerms field
        if self.config.enabled:
            total = scale * self._weighted(sums)
            if not bool(torch.isfinite(total)):
                with torch.no_grad():
                    _raise_non_finite(total, self._evaluate(True)[1], self._bound)
        else:
            total = torch.zeros((), dtype=sums["L_A"].dtype, device=sums["L_A"].device)
        on_s, dw_sq = sums["on_support"], sums["dw_sq"]
        share = torch.where(dw_sq > 0, on_s / torch.where(dw_sq > 0, dw_sq, torch.ones_like(dw_sq)), 0.0)
        detail = _per_module(table, self._bound) if per_module else None
        return PenaltyResult(total, sums["L_A"], sums["L_T"], sums["E_rie"], sums["E_geo"], scale,
                             share, sums["max_abs_dw_s"], detail)

    def _evaluate(self, detail: bool) -> tuple[dict[str, torch.Tensor], Optional[tuple[list[int], torch.Tensor]]]:
        """Sums over modules of every ModuleTerms field (max for max_abs_dw_s); with `detail`, also the
        (bound indices, (n, 7) detached table) of per-module values, group by group."""
        c, fields = self.config, ModuleTerms._fields
        parts: list[list[torch.Tensor]] = []  # per part: one 0-dim tensor per field
        order: list[int] = []
        tables: list[torch.Tensor] = []
        for members, group in self._groups():
            if isinstance(group, FusedKFAC):  # per-module (n,) terms of one batched K-FAC group
                cols = group(c.beta, c.tau, c.eps)
                parts.append([col.amax() if f == "max_abs_dw_s" else col.sum() for f, col in zip(fields, cols)])
                if detail:
                    order += members
                    tables.append(torch.stack([col.detach() for col in cols], dim=1))
                continue
            g = group(c.beta, c.tau, c.eps, detail)
            parts.append([g.L_A, g.L_T.sum(), g.E_rie, g.E_geo.sum(), g.on_support, g.dw_sq.sum(),
                          g.max_abs_dw_s.amax()])
            if detail:
                order += members
                tables.append(torch.stack([g.detail[:, 0], g.L_T.detach(), g.detail[:, 1], g.E_geo.detach(),
                                           g.detail[:, 2], g.dw_sq, g.max_abs_dw_s], dim=1))
        device = parts[0][0].device
        sums = {}
        for k, f in enumerate(fields):
            values = torch.stack([p[k].to(device) for p in parts])
            sums[f] = values.amax() if f == "max_abs_dw_s" else values.sum()
        table = (order, torch.cat([t.double().to(device) for t in tables])) if detail else None
        return sums, table

    def _groups(self) -> list[tuple[list[int], Any]]:
        """Coordinate-basis modules grouped by (device, dtypes, r) into FusedCoordinates; K-FAC-basis modules by
        (device, dtypes, r, shapes) into FusedKFAC. Layouts are re-built when a device or dtype changes."""
        keys = tuple(self._group_key(b) for b in self._bound)
        if keys != self._group_keys:
            by_key: dict[tuple, list[int]] = {}
            for i, key in enumerate(keys):
                b = self._bound[i]
                if b.target.B.device != b.target.A.device:
                    raise ValueError(f"LoRA factors of {b.key!r} are on different devices (A on {b.target.A.device}, "
                                     f"B on {b.target.B.device}); keep lora_A and lora_B of a layer on one device.")
                by_key.setdefault(key, []).append(i)
            groups: list[tuple[list[int], Any]] = []
            for key, idx in by_key.items():
                members = [self._bound[i] for i in idx]
                dtype = _compute_dtype(torch.promote_types(key[2], key[3]))
                if key[0] == "coordinate":
                    groups.append((idx, FusedCoordinates(members, key[1], dtype, self.config.split, self.chunk_size)))
                else:
                    groups.append((idx, FusedKFAC(members, key[1], dtype, self.config.split)))
            self._group_cache, self._group_keys = groups, keys
        return self._group_cache

    @staticmethod
    def _group_key(b: BoundModule) -> tuple:
        t = b.target
        if b.kind == "coordinate":
            return ("coordinate", t.A.device, t.A.dtype, t.B.dtype, t.A.shape[0])
        return ("kfac",) + kfac_key(t, b.block)

    def _scale(self, step: Optional[int]) -> float:
        if step is None:
            return 1.0
        if not isinstance(step, numbers.Integral) or isinstance(step, bool):
            raise ValueError(f"step={step!r} is invalid: pass the optimizer step as an int (or None for no warm-up).")
        return float(self.config.lambda_scale(int(step)))

    def _weighted(self, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.config
        collision = c.alpha * sums["E_rie"] + (1 - c.alpha) * sums["E_geo"]
        return c.lambda_a * sums["L_A"] + c.lambda_t * sums["L_T"] + c.lambda_nc * collision


def _covered_blocks(mask: Any) -> dict[str, Any]:
    """The mask's blocks plus an empty block for each covered module whose support came out empty."""
    blocks = dict(mask.blocks)
    metadata = getattr(mask, "metadata", None)
    empty = metadata.get(EMPTY_KEY) if isinstance(metadata, dict) else None
    for name, shape in (empty or {}).items():
        blocks.setdefault(name, empty_block(name, shape))
    return blocks


def _warn_mask_settings(config: AGLConfig, mask_config: Any) -> None:
    if not isinstance(mask_config, AGLConfig) or mask_config is config:
        return
    ours, theirs = config.mask_settings(), mask_config.mask_settings()
    diff = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    if diff:
        shown = ", ".join(f"{k}: config {a!r} vs mask {b!r}" for k, (a, b) in diff.items())
        logger.warning("AGLConfig mask settings differ from the mask's own (%s); the mask's values are used.", shown)


def _raise_non_finite(total: torch.Tensor, table: Any, bound: list[BoundModule]) -> None:
    order, values = table
    values = values[:, :len(TERMS)].cpu()  # (n_modules, 4): L_A, L_T, E_rie, E_geo
    bad = [pos for pos in range(len(order)) if not bool(torch.isfinite(values[pos]).all())]
    if bad:
        pos = min(bad, key=lambda p: order[p])  # first in model order
        b = bound[order[pos]]
        shown = ", ".join(f"{n}={v:.4g}" for n, v in zip(TERMS, values[pos].tolist()))
        raise FloatingPointError(
            f"AGL penalty is not finite ({float(total.detach())}): first non-finite module {b.key!r} "
            f"(adapter {b.target.adapter!r}): {shown}. Its LoRA weights have diverged or overflowed; "
            "lower the learning rate or the λ's, or train in a wider dtype."
        )
    raise FloatingPointError(
        f"AGL penalty is not finite ({float(total.detach())}) although every module's terms are finite: "
        "the λ-weighted sum overflowed; lower lambda_a / lambda_t / lambda_nc."
    )


def _per_module(table: Any, bound: list[BoundModule]) -> dict[str, dict[str, float]]:
    order, values = table  # (n_modules, 7) float64
    rows = dict(zip(order, values.cpu().tolist()))  # one device sync for the whole table
    out: dict[str, dict[str, float]] = {}
    for i, b in enumerate(bound):  # model order
        row = dict(zip(ModuleTerms._fields, rows[i]))
        row["protected_share"] = row["on_support"] / row["dw_sq"] if row["dw_sq"] > 0 else 0.0
        row["size"] = float(b.size)
        out[b.key] = row
    return out
