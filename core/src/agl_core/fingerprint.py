"""Cheap base-model fingerprint (module shapes + sampled weight hashes) and the mask/model check."""

from __future__ import annotations

import functools
import hashlib
import math
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .modules import find_linear_modules, logical_weight
from .safeio import update_hash

SAMPLE = 65536  # elements hashed per weight, evenly strided over the flat (out, in) weight
METHOD = f"sha256/bf16/strided-{SAMPLE}"
RAW_PREFIX = "raw:"  # non-float (quantised) weights: hash of raw storage bytes, not comparable to float ones
HASH_HEX = 16


def _logical_shape(module: nn.Module, weight: torch.Tensor) -> list[int]:
    if not weight.is_floating_point() and hasattr(module, "out_features") and hasattr(module, "in_features"):
        return [int(module.out_features), int(module.in_features)]  # packed quantised storage
    return [int(s) for s in weight.shape]


@functools.lru_cache(maxsize=64)
def _positions(shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Index tensors of ≤ SAMPLE evenly strided flat row-major positions (shared by equal shapes)."""
    flat_n = math.prod(shape)
    count = min(flat_n, SAMPLE)
    pos = torch.arange(count, dtype=torch.int64) * flat_n // max(count, 1)  # (count,)
    if len(shape) == 2:
        return (pos // shape[1], pos % shape[1])
    return (pos,)


def _sample(weight: torch.Tensor) -> torch.Tensor:
    """(≤ SAMPLE,) evenly strided elements of the flat row-major (out, in) weight, any storage layout."""
    index = tuple(i.to(weight.device) for i in _positions(tuple(weight.shape)))
    return weight[index] if weight.dim() == 2 else weight.reshape(-1)[index[0]]


def weight_hash(module: nn.Module) -> str:
    """Short sha256 of a strided sample of the (out, in) weight, cast to bfloat16 (fp32 and bf16 agree)."""
    weight = logical_weight(module).detach()
    if weight.device.type == "meta":
        raise ValueError("Cannot fingerprint a model on the meta device: load its weights first.")
    hasher = hashlib.sha256()
    hasher.update(repr(tuple(weight.shape)).encode())
    sample = _sample(weight).cpu()
    if weight.is_floating_point():
        update_hash(hasher, sample.to(torch.bfloat16).view(torch.int16))
        return hasher.hexdigest()[:HASH_HEX]
    update_hash(hasher, sample)
    return RAW_PREFIX + hasher.hexdigest()[:HASH_HEX]


def model_fingerprint(model: nn.Module, names: Optional[Iterable[str]] = None) -> dict[str, Any]:
    """{"modules": {name: [out, in]}, "weights": {name: hash}, "method": ...} for the named base linear layers.

    Names are base-model names (a PEFT-wrapped model fingerprints like its base model); names the
    model does not have are left out (check_fingerprint reports them). None: every linear layer.
    """
    wanted = None if names is None else list(names)
    if wanted is not None and not wanted:
        return {"modules": {}, "weights": {}, "method": METHOD}
    found = find_linear_modules(model, wanted)
    if wanted is not None:
        found = {n: found[n] for n in wanted if n in found}
    shapes, hashes = {}, {}
    with torch.no_grad():
        for name, module in found.items():
            shapes[name] = _logical_shape(module, logical_weight(module))
            hashes[name] = weight_hash(module)
    return {"modules": shapes, "weights": hashes, "method": METHOD}


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(differences, notes): one line per differing module; notes for what could not be compared."""
    diffs, notes = [], []
    saved_hash, cur_hash = saved.get("weights", {}), current.get("weights", {})
    raw_mixed = 0
    for name, shape in saved.get("modules", {}).items():
        if name not in current["modules"]:
            diffs.append(f"{name}: missing in the model")
        elif list(current["modules"][name]) != list(shape):
            diffs.append(f"{name}: shape {list(shape)} in the mask, {current['modules'][name]} in the model")
        elif name in saved_hash and name in cur_hash and saved_hash[name] != cur_hash[name]:
            if saved_hash[name].startswith(RAW_PREFIX) != cur_hash[name].startswith(RAW_PREFIX):
                raw_mixed += 1  # quantised vs float weights: hashes are not comparable
            else:
                diffs.append(f"{name}: weights differ (hash {saved_hash[name]} in the mask, {cur_hash[name]} now)")
    if raw_mixed:
        notes.append(
            f"{raw_mixed} module(s) are quantised on one side and float on the other: only shapes were compared."
        )
    return diffs, notes


def check_fingerprint(saved: dict[str, Any], model: nn.Module) -> list[str]:
    """Raise ValueError if `model` is not the base model `saved` was taken from; return notes otherwise."""
    current = model_fingerprint(model, list(saved.get("modules", {})))
    diffs, notes = fingerprint_differences(saved, current)
    if not diffs:
        return notes
    total = len(saved.get("modules", {}))
    missing = sum(d.endswith("missing in the model") for d in diffs)
    examples = "; ".join(diffs[:3])
    raise ValueError(
        f"The mask was estimated on a different base model: {len(diffs)} of {total} modules differ "
        f"({missing} missing), e.g. {examples}. Load the base model the mask was estimated on, or "
        "re-estimate the mask on this model (agl fisher --model <this model> ...)."
    )
