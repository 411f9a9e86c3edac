"""Post-hoc projection: a trained LoRA update with its protected part removed, as a LoRA update again.

For an input-side K-FAC mask (basis=kfac, k_out=all) the protected part of ΔW = s·B·A is ΔW·V·Vᵀ (V: the module's
orthonormal protected input directions), so ΔW·(I − V·Vᵀ) = s·B·(A − (A·V)·Vᵀ): only A changes and the rank stays.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .blocks import KFACBlock
from .mask import FisherMask

LORA_A = ".lora_A.weight"


def project_lora_a(A: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """A·(I − V·Vᵀ) for A (r, in) and V (in, k) with orthonormal columns, computed in float64, returned in A's dtype."""
    if A.dim() != 2 or V.dim() != 2 or A.shape[1] != V.shape[0]:
        raise ValueError(f"Cannot project a LoRA A of shape {tuple(A.shape)} on input directions of shape "
                         f"{tuple(V.shape)}: A must be (r, in) and V (in, k) with the same `in`.")
    a, v = A.detach().to(torch.float64), V.detach().to(device=A.device, dtype=torch.float64)
    return (a - (a @ v) @ v.T).to(A.dtype)


def module_of(key: str) -> str:
    """'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' → 'model.layers.0.self_attn.q_proj'."""
    name = key[: -len(LORA_A)]
    return name[len("base_model.model."):] if name.startswith("base_model.model.") else name


def project_adapter(weights: Mapping[str, torch.Tensor], mask: FisherMask) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A PEFT adapter's tensors with every LoRA A of a protected module projected off the mask's input directions.

    Returns (new tensors, names of the projected modules). ValueError for a mask whose support is not an input-side
    K-FAC block (its removal is not a LoRA update of the same rank) or when no adapter module is in the mask.
    """
    if mask.config.basis != "kfac" or mask.config.k_out != "all":
        raise ValueError(f"Projection needs an input-side mask (basis=kfac, k_out=all); this mask has "
                         f"basis={mask.config.basis}, k_out={mask.config.k_out}, whose protected part of a LoRA "
                         "update is not itself a LoRA update of the same rank. Build one with --basis kfac --k-out all.")
    out, done = dict(weights), []
    for key, tensor in weights.items():
        if not key.endswith(LORA_A):
            continue
        block = mask.blocks.get(module_of(key))
        if isinstance(block, KFACBlock) and block.U is None:
            out[key] = project_lora_a(tensor, block.V)
            done.append(module_of(key))
    if not done:
        raise ValueError("No LoRA module of the adapter is protected by the mask (module names differ?): mask "
                         f"modules look like {next(iter(mask.blocks), 'none')!r}, adapter tensors like "
                         f"{next(iter(weights), 'none')!r}.")
    return out, done


def remove_block(delta: torch.Tensor, U: torch.Tensor | None = None, V: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW − P_U·ΔW·P_V for a dense update ΔW (out, in), with P_U = U·Uᵀ and P_V = V·Vᵀ (orthonormal columns; None =
    the identity on that side): the update with its part on a K-FAC block support (output directions U × input
    directions V) removed. Not a LoRA update of the same rank in general, so it is returned dense (float64)."""
    d = delta.detach().to(torch.float64)
    for side, M, size in (("output", U, d.shape[0]), ("input", V, d.shape[1])):
        if M is not None and (M.dim() != 2 or M.shape[0] != size):
            raise ValueError(f"Cannot remove a block from an update of shape {tuple(d.shape)} with {side} directions "
                             f"of shape {tuple(M.shape)}: they must be ({size}, k).")
    if U is None and V is None:
        return d - d
    part = d
    if V is not None:
        v = V.detach().to(device=d.device, dtype=torch.float64)
        part = (part @ v) @ v.T
    if U is not None:
        u = U.detach().to(device=d.device, dtype=torch.float64)
        part = u @ (u.T @ part)
    return d - part
