"""Finding the base linear layers and the LoRA factors of a (PEFT) model, without importing PEFT."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."
LORA_LAYER_NAMES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


WRAPPER_SEGMENTS = ("_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


def base_name(name: str) -> str:
    """Module name in the plain base model: drops DDP's leading `module.`, torch.compile / FSDP / activation
    checkpointing wrapper segments, and PEFT's `base_model.model.` prefix."""
    parts = [p for p in name.split(".") if p not in WRAPPER_SEGMENTS]
    if parts[:1] == ["module"]:
        parts = parts[1:]
    name = ".".join(parts)
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def naming_root(model: nn.Module) -> nn.Module:
    """The module whose child names are base-model names: a PEFT tuner (LoraModel) names its model `.model`."""
    while callable(getattr(model, "inject_adapter", None)) and isinstance(getattr(model, "model", None), nn.Module):
        model = model.model
    return model


def name_matches(name: str, patterns: Optional[Iterable[str]]) -> bool:
    """True if `patterns` is None, or `name` equals / ends with '.'+pattern / fully matches 're:<regex>'."""
    if patterns is None:
        return True
    for pat in patterns:
        if pat.startswith("re:"):
            if re.fullmatch(pat[3:], name):
                return True
        elif name == pat or name.endswith("." + pat):
            return True
    return False


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (weight stored (in, out)), recognised by duck typing."""
    if isinstance(module, nn.Linear):
        return True
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def logical_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as (out, in), whatever its storage layout."""
    w = module.weight
    return w.t() if type(module).__name__ == "Conv1D" else w


def _output_embedding_ids(model: nn.Module) -> set[int]:
    getter = getattr(model, "get_output_embeddings", None)
    try:
        out = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        out = None
    return {id(out)} if out is not None else set()


def find_linear_modules(model: nn.Module, target_modules: Optional[list[str]] = None) -> dict[str, nn.Module]:
    """Base linear layers keyed by base-model name; LoRA-wrapped layers give their frozen `base_layer`.

    The output embedding (`lm_head`) is skipped unless named explicitly in `target_modules`.
    """
    skip = _output_embedding_ids(model)
    found: dict[str, nn.Module] = {}
    for name, module in naming_root(model).named_modules():
        parts = name.split(".")
        if any(p in LORA_LAYER_NAMES for p in parts) or (parts and parts[-1] == "base_layer"):
            continue
        layer = module.base_layer if hasattr(module, "lora_A") and hasattr(module, "base_layer") else module
        while hasattr(layer, "base_layer"):
            layer = layer.base_layer
        if not is_linear(layer):
            continue
        key = base_name(name)
        if id(layer) in skip and (target_modules is None or not any(key == p for p in target_modules)):
            continue
        if name_matches(key, target_modules):
            found[key] = layer
    return found


@dataclass
class LoRATarget:
    """One trainable LoRA adapter on one linear layer: ΔW = scale · B @ A, shape (out, in)."""

    name: str  # base-model module name, e.g. model.layers.0.self_attn.q_proj
    adapter: str
    A: torch.Tensor  # (r, in)  lora_A weight
    B: torch.Tensor  # (out, r) lora_B weight
    scale: float
    base_layer: nn.Module

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])


def _active_adapters(module: nn.Module) -> list[str]:
    active = getattr(module, "active_adapters", None)
    if active is None:
        active = getattr(module, "active_adapter", [])
    return [active] if isinstance(active, str) else list(active)


def _check_supported(name: str, module: nn.Module, adapter: str) -> None:
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if getattr(module, "use_dora", {}).get(adapter) or variant is not None:
        kind = "DoRA" if getattr(module, "use_dora", {}).get(adapter) else type(variant).__name__
        raise ValueError(
            f"Module {name!r}, adapter {adapter!r} is a {kind} adapter. AGL supports plain LoRA only "
            "(ΔW = s·B·A); create the adapter with a LoraConfig without use_dora or other LoRA variants."
        )
    if adapter in getattr(module, "lora_embedding_A", {}) or not is_linear(_innermost(module)):
        raise ValueError(
            f"Module {name!r} ({type(module).__name__}) has LoRA on a non-linear layer; AGL covers LoRA on "
            "Linear layers only. Remove it from LoraConfig.target_modules or exclude it with AGLConfig.target_modules."
        )


def _innermost(module: nn.Module) -> nn.Module:
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def _is_foreign_tuner(module: nn.Module) -> bool:
    names = getattr(type(module), "adapter_layer_names", None)
    return bool(names) and not set(names) <= set(LORA_LAYER_NAMES)


def find_lora_targets(
    model: nn.Module, adapters: Optional[list[str]] = None, target_modules: Optional[list[str]] = None
) -> list[LoRATarget]:
    """Every active, trainable LoRA adapter's factors; frozen or inactive adapters (e.g. TRL's `ref`) are skipped.

    Raises ValueError for DoRA / LoRA variants, LoRA on non-linear layers and non-LoRA PEFT adapters.
    """
    targets: list[LoRATarget] = []
    for name, module in naming_root(model).named_modules():
        if _is_foreign_tuner(module):
            raise ValueError(
                f"Module {name!r} carries a {type(module).__name__} adapter; AGL supports LoRA adapters only."
            )
        if not (hasattr(module, "lora_A") and hasattr(module, "lora_B") and hasattr(module, "scaling")):
            continue
        key = base_name(name)
        if not name_matches(key, target_modules):
            continue
        for adapter in _active_adapters(module):
            if adapters is not None and adapter not in adapters:
                continue
            if adapter not in module.lora_A and adapter not in getattr(module, "lora_embedding_A", {}):
                continue
            _check_supported(name, module, adapter)
            a_w, b_w = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            if not (a_w.requires_grad or b_w.requires_grad):
                continue
            targets.append(LoRATarget(key, adapter, a_w, b_w, float(module.scaling[adapter]), _innermost(module)))
    return targets
