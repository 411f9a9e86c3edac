"""LoRA update pieces without materialising ΔW: chunked coordinate gather, Gram norm, K-FAC projection."""

from __future__ import annotations

from typing import Optional

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK = 65536


def _decode(index: torch.Tensor, start: int, stop: int, n_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) int64 indices of flat row-major coordinates index[start:stop], each (c,)."""
    flat = index[start:stop].long()
    rows = torch.div(flat, n_cols, rounding_mode="floor")
    return rows, flat - rows * n_cols


class _LoRAGather(torch.autograd.Function):
    """d_j = s · Σ_r B[i_j, r] · A[r, k_j] for flat coordinates j = i_j · n + k_j, computed chunk by chunk.

    Only A, B and the index are saved for backward; the (chunk, r) gathers exist one chunk at a time.
    """

    @staticmethod
    def forward(ctx, A, B, index, n_cols, scale, chunk):  # A (r, in), B (out, r), index (|S|,)
        a_t = A.t().contiguous()  # (in, r): rows of Aᵀ are columns of A; contiguous rows gather fast
        out = torch.empty(index.shape[0], dtype=A.dtype, device=A.device)  # (|S|,)
        for start in range(0, index.shape[0], chunk):
            stop = min(start + chunk, index.shape[0])
            rows, cols = _decode(index, start, stop, n_cols)
            # (c, r) * (c, r) -> (c,)
            out[start:stop] = (B.index_select(0, rows) * a_t.index_select(0, cols)).sum(dim=1)
        out.mul_(scale)
        ctx.save_for_backward(A, B, index)
        ctx.n_cols, ctx.scale, ctx.chunk = n_cols, scale, chunk
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # grad (|S|,)
        A, B, index = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        a_t = A.t().contiguous()  # (in, r)
        grad_at = torch.zeros_like(a_t, memory_format=torch.contiguous_format) if need_a else None  # (in, r)
        grad_b = torch.zeros_like(B, memory_format=torch.contiguous_format) if need_b else None  # (out, r)
        for start in range(0, index.shape[0], ctx.chunk):
            stop = min(start + ctx.chunk, index.shape[0])
            rows, cols = _decode(index, start, stop, ctx.n_cols)
            g = (grad[start:stop] * ctx.scale).unsqueeze(1)  # (c, 1)
            if need_b:
                grad_b.index_add_(0, rows, g * a_t.index_select(0, cols))  # (c, r) into rows of B
            if need_a:
                grad_at.index_add_(0, cols, g * B.index_select(0, rows))  # (c, r) into rows of Aᵀ
        grad_a = grad_at.t() if need_a else None  # (r, in)
        return grad_a, grad_b, None, None, None, None


def _check_factors(A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(
            f"LoRA factors must be A (r, in) and B (out, r) with the same r; got A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}. Pass lora_A.weight and lora_B.weight of one adapter."
        )
    if A.dtype != B.dtype or A.device != B.device:
        raise ValueError(
            f"LoRA factors differ in dtype/device (A {A.dtype} on {A.device}, B {B.dtype} on {B.device}); "
            "cast both to one dtype and device first."
        )
    if not A.is_floating_point():
        raise ValueError(f"LoRA factors must be floating point, got {A.dtype}.")


def gather_delta(
    A: torch.Tensor, B: torch.Tensor, index: torch.Tensor, n_cols: int, scale: float, chunk: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """ΔW = scale · B · A at flat row-major coordinates `index` of the (out, in) weight, as (|S|,).

    Differentiable in A and B; forward and backward run in chunks of `chunk` coordinates (bounded memory).
    """
    _check_factors(A, B)
    if index.dim() != 1 or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"index must be a 1-D int32/int64 tensor of flat coordinates, got {index.dtype} {tuple(index.shape)}."
        )
    if n_cols != A.shape[1]:
        raise ValueError(f"n_cols={n_cols} differs from A's input size {A.shape[1]}; pass n_cols=A.shape[1].")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise ValueError(f"chunk={chunk!r} is invalid: must be an integer ≥ 1 (e.g. {DEFAULT_CHUNK}).")
    if index.device != A.device:
        raise ValueError(f"index is on {index.device} but the LoRA factors on {A.device}; move it with .to().")
    return _LoRAGather.apply(A, B, index, int(n_cols), float(scale), chunk)


def delta_sq_norm(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """‖scale · B · A‖²_F = scale² · ⟨BᵀB, AAᵀ⟩ from the r×r Gram matrices (never builds ΔW)."""
    _check_factors(A, B)
    gram_b = B.t() @ B  # (r, r)
    gram_a = A @ A.t()  # (r, r)
    return (scale * scale) * (gram_b * gram_a).sum()


def kfac_project(
    A: torch.Tensor, B: torch.Tensor, scale: float, U: Optional[torch.Tensor], V: torch.Tensor
) -> torch.Tensor:
    """C = scale · (Uᵀ B)(A V) (k_out, k_in), or scale · B (A V) (out, k_in) when U is None."""
    _check_factors(A, B)
    av = A @ V  # (r, k_in)
    left = B if U is None else U.t() @ B  # (k_out or out, r)
    return scale * (left @ av)
