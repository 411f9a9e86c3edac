"""Start-up checks of the HF adapter: config and mask arguments, and refusal of engines it cannot serve exactly."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from agl_core import AGLConfig, FisherMask

FISHER_CMD = "agl fisher --model <your base model> --data builtin:alignment-v1 --out <mask folder>"
_ENV_ENGINES = (
    ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"),
    ("ACCELERATE_USE_FSDP", "FSDP"),
    ("ACCELERATE_USE_MEGATRON_LM", "Megatron-LM"),
)
_WHY = {
    "DeepSpeed": "the DeepSpeed engine owns the gradients and steps inside backward(), so a gradient the callback "
                 "adds before the step is lost or partitioned wrongly",
    "FSDP": "FSDP shards the LoRA weights outside the forward pass, so the callback sees shards, not A and B",
    "Megatron-LM": "Megatron-LM splits the layers across ranks, so no rank holds every LoRA factor",
    "sharded (DTensor) LoRA weights": "the LoRA weights are DTensor shards (FSDP2 / tensor parallel), so the "
                                      "callback sees shards, not A and B",
}


def as_config(config: Any) -> Optional[AGLConfig]:
    """An AGLConfig from an AGLConfig, a dict of its options, or None (None: the mask's own config)."""
    if config is None or isinstance(config, AGLConfig):
        return config
    if isinstance(config, dict):
        return AGLConfig.from_dict(config)
    raise ValueError(
        f"AGLCallback got config of type {type(config).__name__}; pass an agl_core.AGLConfig, a dict of its "
        "options (e.g. {'mask_path': 'mask/', 'lambda_a': 1.0}), or None."
    )


def mask_source(mask: Any, config: Optional[AGLConfig]) -> Any:
    """The mask argument to use: a FisherMask or a path, defaulting to config.mask_path."""
    if mask is None:
        mask = config.mask_path if config is not None else None
    if mask is None:
        raise ValueError(
            "AGLCallback needs a Fisher mask: pass mask=<FisherMask or path>, or AGLConfig(mask_path='mask/'). "
            f"Create one with: {FISHER_CMD}"
        )
    if not isinstance(mask, (FisherMask, str, os.PathLike)):
        raise ValueError(
            f"AGLCallback got mask of type {type(mask).__name__}; pass a FisherMask, or the path of a mask "
            "(a mask.safetensors file or the folder holding it)."
        )
    return mask


def load_mask(source: Any) -> FisherMask:
    """The FisherMask itself, or FisherMask.load(path) (its ValueError names the file and the fix)."""
    if isinstance(source, FisherMask):
        return source
    return FisherMask.load(Path(source))


def unsupported_engine(args: Any) -> Optional[str]:
    """Name of a training engine under which the callback cannot add an exact penalty, or None."""
    if getattr(args, "deepspeed", None):
        return "DeepSpeed"
    if getattr(args, "fsdp", None):
        return "FSDP"
    for var, name in _ENV_ENGINES:
        if os.environ.get(var, "false").strip().lower() in ("1", "true", "yes"):
            return name
    return None


def refuse_engine(args: Any, params: Optional[list[torch.Tensor]] = None) -> None:
    """ValueError at start-up under DeepSpeed, FSDP, Megatron-LM or with sharded (DTensor) LoRA weights."""
    engine = unsupported_engine(args)
    if engine is None and params and _has_dtensor(params):
        engine = "sharded (DTensor) LoRA weights"
    if engine is None:
        return
    raise ValueError(
        f"AGL cannot yet guarantee an exact penalty under {engine}: {_WHY[engine]}. Run without it (a single "
        "process, or plain DDP with `torchrun` / `accelerate launch` and no DeepSpeed/FSDP config), or remove "
        "AGLCallback to train without AGL."
    )


def _has_dtensor(params: list[torch.Tensor]) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in params)
