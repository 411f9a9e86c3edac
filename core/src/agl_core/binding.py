"""Matching a mask's blocks to a model's LoRA targets, with validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .blocks import Block, CoordinateBlock, KFACBlock
from .config import AGLConfig
from .modules import LoRATarget, find_lora_targets

ORTHO_TOL = 1e-3  # max |QᵀQ − I| accepted for the stored (float32) K-FAC bases


@dataclass
class BoundModule:
    """One LoRA target with its mask block."""

    key: str
    target: LoRATarget
    block: Block

    @property
    def kind(self) -> str:
        return "coordinate" if isinstance(self.block, CoordinateBlock) else "kfac"

    @property
    def size(self) -> int:
        return self.block.size


def empty_block(name: str, shape: Any) -> CoordinateBlock:
    """A covered module whose support is empty: only L_T (= ‖ΔW‖²) is non-zero there."""
    if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and all(isinstance(v, int) for v in shape)):
        raise ValueError(f"The mask lists {name!r} as an empty module with shape {shape!r}; expected [out, in].")
    return CoordinateBlock((shape[0], shape[1]), torch.zeros(0, dtype=torch.int32), torch.zeros(0), 1.0, 0.0)


def bind_targets(model: nn.Module, blocks: dict[str, Any], config: AGLConfig) -> tuple[list[BoundModule], list[str]]:
    """(bound modules in model order, mask module names without a trainable LoRA adapter)."""
    targets = find_lora_targets(model, config.adapters, config.target_modules)
    if not targets:
        raise ValueError(
            "No active, trainable LoRA adapter found in the model "
            f"(AGLConfig.adapters={config.adapters}, target_modules={config.target_modules}). Wrap the model "
            "with peft.get_peft_model(model, LoraConfig(...)) before attaching AGL, and check that the adapter "
            "is active and its lora_A/lora_B weights require grad."
        )
    missing = list(dict.fromkeys(t.name for t in targets if t.name not in blocks))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(
            f"{len(missing)} LoRA module(s) have no entry in the mask: {missing[:5]}{more}. Re-estimate the mask "
            "covering these modules, or exclude them with AGLConfig.target_modules."
        )
    _refuse_stacked_adapters(targets)
    adapters = {t.adapter for t in targets}
    bound = []
    for t in targets:
        _check_block(t, blocks[t.name], config.split)
        key = t.name if len(adapters) == 1 else f"{t.name}[{t.adapter}]"
        bound.append(BoundModule(key, t, blocks[t.name]))
    used = {t.name for t in targets}
    return bound, [name for name in blocks if name not in used]


def _refuse_stacked_adapters(targets: list[LoRATarget]) -> None:
    """Two trainable adapters on one layer add up to one ΔW; penalising each alone would be the wrong math."""
    per_module: dict[str, list[str]] = {}
    for t in targets:
        per_module.setdefault(t.name, []).append(t.adapter)
    stacked = {name: ads for name, ads in per_module.items() if len(ads) > 1}
    if stacked:
        name, ads = next(iter(stacked.items()))
        raise ValueError(
            f"{len(stacked)} module(s) carry several active trainable LoRA adapters (e.g. {name!r}: {ads}). AGL "
            "penalises one LoRA update per layer: train one adapter at a time, freeze the others, or choose one "
            "with AGLConfig.adapters."
        )


def _check_block(target: LoRATarget, block: Any, split: str) -> None:
    where = f"mask block of {target.name!r}"
    if not isinstance(block, (CoordinateBlock, KFACBlock)):
        raise ValueError(f"The {where} is a {type(block).__name__}; expected a CoordinateBlock or a KFACBlock.")
    if tuple(block.shape) != tuple(target.shape):
        raise ValueError(
            f"The {where} has shape {tuple(block.shape)} but the LoRA update there is {tuple(target.shape)} "
            "(out, in): the mask was estimated on a different model. Re-estimate it on this base model."
        )
    _check_scalar(where, "norm", block.norm, positive=True)
    _check_scalar(where, "kappa", block.kappa, positive=False)
    if isinstance(block, CoordinateBlock):
        _check_coordinate(where, block)
        smallest = float(block.fisher.min()) if block.size else 1.0
    else:
        _check_kfac(where, block)
        smallest = float(block.mu.min()) * float(block.lam.min()) if block.size else 1.0
    if split == "soft" and float(block.kappa) == 0 and smallest == 0:
        raise ValueError(f"The {where} has kappa=0 and a zero Fisher value, so m = F/(F+κ) is 0/0 under "
                         "split=soft. Rebuild the mask (κ must be > 0 where F can be 0), or use split=hard.")


def _check_scalar(where: str, name: str, value: Any, positive: bool) -> None:
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):
        number = math.nan
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        bound = "> 0" if positive else "≥ 0"
        raise ValueError(f"The {where} has {name}={value!r}; it must be a finite number {bound}. Rebuild the mask.")


def _check_weights(where: str, name: str, values: torch.Tensor, length: Optional[int] = None) -> None:
    if values.dim() != 1 or not values.is_floating_point() or (length is not None and values.numel() != length):
        want = f" of length {length}" if length is not None else ""
        raise ValueError(f"The {where}: {name} must be a 1-D float tensor{want}, got {values.dtype} "
                         f"{tuple(values.shape)}. Rebuild the mask.")
    if values.numel() and not bool((torch.isfinite(values) & (values >= 0)).all()):
        raise ValueError(f"The {where}: {name} has negative or non-finite entries; Fisher values must be ≥ 0.")


def _check_coordinate(where: str, block: CoordinateBlock) -> None:
    idx = block.index
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"The {where}: index must be a 1-D int32/int64 tensor, got {idx.dtype} {tuple(idx.shape)}.")
    _check_weights(where, "fisher", block.fisher, idx.numel())
    if not idx.numel():
        return
    cpu = idx.detach().cpu().long()
    numel = block.shape[0] * block.shape[1]
    if int(cpu.min()) < 0 or int(cpu.max()) >= numel:
        raise ValueError(f"The {where}: index has entries outside [0, {numel}) for shape {tuple(block.shape)}.")
    if not bool((cpu[1:] > cpu[:-1]).all()) and torch.unique(cpu).numel() != cpu.numel():
        raise ValueError(f"The {where}: index has repeated coordinates; each protected coordinate must appear once.")


def _check_kfac(where: str, block: KFACBlock) -> None:
    out, inp = block.shape
    if block.V.dim() != 2 or block.V.shape[0] != inp:
        raise ValueError(f"The {where}: V must be (in={inp}, k_in), got {tuple(block.V.shape)}.")
    _check_weights(where, "lam", block.lam, block.V.shape[1])
    if block.U is None:
        _check_weights(where, "mu", block.mu, out)
    else:
        if block.U.dim() != 2 or block.U.shape[0] != out:
            raise ValueError(f"The {where}: U must be (out={out}, k_out), got {tuple(block.U.shape)}.")
        _check_weights(where, "mu", block.mu, block.U.shape[1])
    for name in ("U", "V"):
        q = getattr(block, name)
        if q is None:
            continue
        q = q.detach().cpu().double()
        err = (q.t() @ q - torch.eye(q.shape[1], dtype=torch.float64)).abs().max().item() if q.numel() else 0.0
        if not err <= ORTHO_TOL:
            raise ValueError(f"The {where}: {name} must have orthonormal columns (max |{name}ᵀ{name} − I| = "
                             f"{err:.3g} > {ORTHO_TOL}); the K-FAC terms rely on it. Rebuild the mask.")
