"""Batched K-FAC-basis penalty: every K-FAC module of one shape, rank, dtype and device in one set of bmm's.

A group holds n modules with equal (out, in), rank r, protected block (k_out or out, k_in) and U present or not.
At bind time it stacks the static tensors once: V (n, in, k_in), Uᵀ (n, k_out, out) when k_out ≠ all, the
split weights m and F̂ (n, k_out or out, k_in) and the scales (n, 1, 1). Per call it stacks the LoRA factors
(torch.stack: autograd sends the gradients back to every module's A and B) and computes

    C  = s · (Uᵀ B)(A V)              (n, k_out or out, k_in)   one bmm per side
    ‖ΔW‖² = s² ⟨BᵀB, AAᵀ⟩             (n,)                      two (n, r, r) Grams

and the per-module terms with reductions over the last two dimensions — the same formulas as the
per-module path (agl_core.penalty.module_terms), a fixed number of kernels however many modules there are.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.autograd.function import once_differentiable

from .blocks import split_weights


def kfac_key(target: Any, block: Any) -> tuple:
    """What modules must share to be batched: device, dtypes, rank, shape, block shape, U present."""
    return (target.A.device, target.A.dtype, target.B.dtype, int(target.A.shape[0]), tuple(target.shape),
            block.U is None, int(block.mu.numel()), int(block.lam.numel()))


class _GramNorm(torch.autograd.Function):
    """Σ_ab (BᵀB)_ab (AAᵀ)_ab per batch entry, (n,), for B (n, out, r), A (n, r, in); hand-written backward
    (∂/∂B = 2 B AAᵀ, ∂/∂A = 2 BᵀB A: two bmm's, where autograd's bmm backward takes transposed slow paths)."""

    @staticmethod
    def forward(ctx, B, A):
        gram_b = torch.bmm(B.transpose(1, 2), B)  # (n, r, r)
        gram_a = torch.bmm(A, A.transpose(1, 2))  # (n, r, r)
        ctx.save_for_backward(B, A, gram_b, gram_a)
        return (gram_b * gram_a).sum(dim=(1, 2))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # (n,)
        B, A, gram_b, gram_a = ctx.saved_tensors
        g2 = (2 * grad).view(-1, 1, 1)
        grad_b = torch.bmm(B, gram_a * g2) if ctx.needs_input_grad[0] else None
        grad_a = torch.bmm(gram_b * g2, A) if ctx.needs_input_grad[1] else None
        return grad_b, grad_a


class FusedKFAC:
    """The static stacked tensors of one group of K-FAC-basis modules; calling it gives per-module terms."""

    def __init__(self, members: Sequence[Any], device: torch.device, dtype: torch.dtype, split: str) -> None:
        self.members, self.dtype = list(members), dtype
        blocks = [m.block for m in self.members]
        self.V = torch.stack([b.V.detach().to(device, dtype) for b in blocks])  # (n, in, k_in)
        self.Ut = None if blocks[0].U is None else torch.stack(
            [b.U.detach().to(device, dtype).t() for b in blocks])  # (n, k_out, out)
        fisher = torch.stack([torch.outer(b.mu.detach().cpu().double(), b.lam.detach().cpu().double())
                              for b in blocks])  # (n, a, k_in) float64
        kappa = torch.tensor([float(b.kappa) for b in blocks], dtype=torch.float64).view(-1, 1, 1)
        norm = torch.tensor([float(b.norm) for b in blocks], dtype=torch.float64).view(-1, 1, 1)
        m = split_weights(fisher, kappa, split)  # (n, a, k_in) float64
        self.m = m.to(device, dtype)
        self.fm2 = (fisher / norm * m * m).to(device, dtype)  # F̂ m²
        self.mm = (m - m * m).to(device, dtype)  # m(1 − m)
        self.scale = torch.tensor([float(mb.target.scale) for mb in self.members],
                                  dtype=torch.float64).to(device, dtype).view(-1, 1, 1)  # (n, 1, 1)

    def nbytes(self) -> int:
        """Bytes of the group's stacked static tensors (V, Uᵀ, m, m(1−m), F̂m², scales)."""
        tensors = [self.V, self.m, self.mm, self.fm2, self.scale] + ([] if self.Ut is None else [self.Ut])
        return sum(t.numel() * t.element_size() for t in tensors)

    def __call__(self, beta: float, tau: float, eps: float) -> tuple[torch.Tensor, ...]:
        """(L_A, L_T, E_rie, E_geo, on_support, dw_sq, max_abs) per module, each (n,); the last three detached."""
        targets = [m.target for m in self.members]
        A = torch.stack([t.A for t in targets]).to(self.dtype)  # (n, r, in)
        B = torch.stack([t.B for t in targets]).to(self.dtype)  # (n, out, r)
        s = self.scale
        dw_sq = (s * s).view(-1) * _GramNorm.apply(B, A)  # (n,) ‖ΔW‖²_F = s² ⟨BᵀB, AAᵀ⟩
        left = B if self.Ut is None else torch.bmm(self.Ut, B)  # (n, a, r)
        d = s * torch.bmm(left, torch.bmm(A, self.V))  # (n, a, k_in) = C
        d2 = d * d
        md2 = self.m * d2  # m C²
        l_a = (self.fm2 * d2).sum(dim=(1, 2))  # Σ F̂ m² C²
        s_m = md2.sum(dim=(1, 2))  # Σ m C²
        overlap = self.mm * d2  # m(1 − m) C²: summands of ⟨ΔW_A, ΔW_T⟩
        inner = overlap.sum(dim=(1, 2))
        a_sq = s_m - inner  # ‖ΔW_A‖² = Σ m² C²
        l_t = (dw_sq - (s_m + inner)).clamp(min=0)  # ‖ΔW_T‖² = ‖ΔW‖² − Σ (2m − m²) C²
        size = d.shape[1] * d.shape[2]
        eta = 1 + beta * torch.sigmoid(d.abs() - tau)
        e_rie = (eta * overlap).sum(dim=(1, 2)) / max(size, 1)
        e_geo = inner * inner / (a_sq * l_t + eps)
        with torch.no_grad():
            on_s = d2.sum(dim=(1, 2))
            max_abs = d.abs().amax(dim=(1, 2)) if size else d.new_zeros(d.shape[0])
        return l_a, l_t, e_rie, e_geo, on_s.detach(), dw_sq.detach(), max_abs
