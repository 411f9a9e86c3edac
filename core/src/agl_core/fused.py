"""Fused coordinate-basis penalty: every module of one device/dtype/rank in one sparse product, Grams batched.

Layout (built once per group, re-built when the LoRA weights change device or dtype):
  B_cat  (ΣN_out, r)  the modules' B factors stacked by rows, ordered by out size (same-shaped B's adjacent),
                      times each module's scale s, so ΔW_j = B_cat[row_j] · At_cat[col_j];
  At_cat (ΣN_in, r)   the modules' Aᵀ stacked by rows, ordered by in size;
  the protected coordinates as one sparse CSR pattern of the block-diagonal (ΣN_out, ΣN_in) ΔW: module by
  module (B order), row-major inside a module, so rows ascend and each module is one contiguous run.
Forward: ΔW_S = sampled_addmm(pattern, B_cat, At_catᵀ) (an SDDMM, cost |S|·r), then per-module sums of the
coordinate terms (index_add_ over module ids, accumulated in float64). Backward: ∂/∂ΔW_S elementwise, then
∂B_cat = G @ At_cat with G the CSR matrix of those values, and ∂At_cat = Gᵀ @ B_cat through a second,
column-ordered CSR copy of the pattern. Everything runs in chunks of whole rows (columns) of ≈ `chunk`
coordinates: the working set is O(chunk · r); the cache is 16 bytes per protected coordinate (column,
Fisher value, column-order permutation and row) plus 4 bytes of saved ΔW_S during a step; nothing of size
out × in is ever built.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Sequence

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK = 1 << 20  # coordinates per chunk of the fused path

# Outputs of the fused function, sums over S of a coefficient times ΔW_j²:
#   per module (n, 2):  Σ m d² and Σ m(1−m) d²  (‖ΔW_A‖² = Σm d² − Σm(1−m) d², ‖ΔW‖² − ‖ΔW_T‖² = Σm d² + Σm(1−m) d²)
#   global (3,):        Σ F̂ m² d² (L_A), Σ η m(1−m) d² / |S_k| (E_rie), Σ d² (energy on S)
#   detail (n, 3):      the global three per module, only when asked for (diagnostics, not differentiable)
class GroupTerms(NamedTuple):
    """One group's terms: L_A, E_rie, on_support summed over the group (0-dim); the rest per module (n,),
    in member order. `detail` is None, or (n, 3) per-module [L_A, E_rie, on_support] (detached)."""

    L_A: torch.Tensor
    L_T: torch.Tensor
    E_rie: torch.Tensor
    E_geo: torch.Tensor
    on_support: torch.Tensor
    dw_sq: torch.Tensor
    max_abs_dw_s: torch.Tensor
    detail: Any


class _RowChunk(NamedTuple):
    r0: int  # rows [r0, r1) of B_cat
    r1: int
    s0: int  # coordinates [s0, s1)
    s1: int
    crow: torch.Tensor  # (r1 − r0 + 1,) CSR row pointers of the chunk, from 0
    modules: torch.Tensor  # (k,) B-order ids of the modules the chunk touches
    counts: torch.Tensor  # (k,) coordinates of each of them inside the chunk


class _ColChunk(NamedTuple):
    c0: int  # rows [c0, c1) of At_cat
    c1: int
    t0: int  # positions [t0, t1) in column order
    t1: int
    ccol: torch.Tensor  # (c1 − c0 + 1,) CSR pointers of the column-ordered pattern, from 0


def _csr(pointers: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # beta-state and invariant-check notices
        return torch.sparse_csr_tensor(pointers, indices, values, shape, check_invariants=False)


def _coefficients(layout: "FusedCoordinates", ch: _RowChunk, dtype: torch.dtype):
    """(module id (c,), F̂ (c,), m (c,), 1/max(|S_k|, 1) (c,)) of the chunk's coordinates."""
    seg = torch.repeat_interleave(ch.modules, ch.counts, output_size=ch.s1 - ch.s0)  # (c,)
    f = layout.fisher[ch.s0:ch.s1].to(dtype)
    m = torch.ones_like(f) if layout.hard else f / (f + layout.kappa.index_select(0, seg))
    return seg, f * layout.inv_norm.index_select(0, seg), m, layout.inv_size.index_select(0, seg)


def _segment_add(out: torch.Tensor, seg: torch.Tensor, values: torch.Tensor) -> None:
    out.index_add_(0, seg, values.to(out.dtype))  # float64 accumulator: index_add_ adds in sequence


class _FusedSums(torch.autograd.Function):
    """(per (n, 2), glob (3,), detail (n, 3), max_S |ΔW| (n,)) of a group from B_cat and At_cat (see above)."""

    @staticmethod
    def forward(ctx, B, At, layout, beta, tau, detail):
        n, f64 = layout.n_modules, torch.float64
        per = torch.zeros(n, 2, dtype=f64, device=B.device)
        glob = torch.zeros(3, dtype=f64, device=B.device)
        more = torch.zeros(n, 3, dtype=f64, device=B.device) if detail else torch.zeros(0, 3, dtype=f64, device=B.device)
        amax = torch.zeros(n, dtype=B.dtype, device=B.device)  # (n,)
        d_all = torch.empty(layout.size, dtype=B.dtype, device=B.device)  # (|S|,)
        zeros = torch.zeros(layout.max_chunk, dtype=B.dtype, device=B.device)
        for ch in layout.row_chunks:
            pattern = _csr(ch.crow, layout.cols[ch.s0:ch.s1], zeros[:ch.s1 - ch.s0], (ch.r1 - ch.r0, At.shape[0]))
            d = torch.sparse.sampled_addmm(pattern, B[ch.r0:ch.r1], At.t(), beta=0.0).values()  # (c,)
            d_all[ch.s0:ch.s1] = d
            seg, fhat, m, inv_size = _coefficients(layout, ch, B.dtype)
            d2 = d * d
            md2 = m * d2  # m d²
            mmd2 = md2 - m * md2  # m(1−m) d²
            _segment_add(per[:, 0], seg, md2)
            _segment_add(per[:, 1], seg, mmd2)
            l_a = fhat * m * md2
            e_rie = (1 + beta * torch.sigmoid(d.abs() - tau)) * inv_size * mmd2
            glob += torch.stack([l_a.sum(dtype=f64), e_rie.sum(dtype=f64), d2.sum(dtype=f64)])
            if detail:
                for col, values in enumerate((l_a, e_rie, d2)):
                    _segment_add(more[:, col], seg, values)
            amax.scatter_reduce_(0, seg, d.abs(), "amax")
        ctx.save_for_backward(B, At, d_all)
        ctx.layout, ctx.beta, ctx.tau = layout, beta, tau
        more, amax = more.to(B.dtype), amax
        ctx.mark_non_differentiable(more, amax)
        return per.to(B.dtype), glob.to(B.dtype), more, amax

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_per, grad_glob, _grad_more, _grad_amax):  # (n, 2), (3,)
        B, At, d_all = ctx.saved_tensors
        layout, beta, tau = ctx.layout, ctx.beta, ctx.tau
        need_b, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_b = torch.zeros_like(B, memory_format=torch.contiguous_format) if need_b else None
        gd_all = torch.empty_like(d_all)  # ∂total/∂ΔW_S (|S|,)
        g_m, g_mm = grad_per[:, 0].contiguous(), grad_per[:, 1].contiguous()
        g_la, g_rie, g_on = (float(v) for v in grad_glob.double().cpu())  # one sync per backward
        for ch in layout.row_chunks:
            d = d_all[ch.s0:ch.s1]
            seg, fhat, m, inv_size = _coefficients(layout, ch, B.dtype)
            mm = m - m * m
            # ∂/∂d of Σ c d² is 2 c d; of Σ η(d) c d²: c (2 η d + β σ'(|d| − τ) sign(d) d²)
            linear = g_la * fhat * m * m + g_on + g_m.index_select(0, seg) * m + g_mm.index_select(0, seg) * mm
            sig = torch.sigmoid(d.abs() - tau)
            gate = 2 * (1 + beta * sig) * d + beta * sig * (1 - sig) * torch.sign(d) * d * d
            gd = 2 * d * linear + (g_rie * inv_size * mm) * gate  # (c,)
            gd_all[ch.s0:ch.s1] = gd
            if need_b:  # rows of B_cat: G[r0:r1] @ At_cat
                G = _csr(ch.crow, layout.cols[ch.s0:ch.s1], gd, (ch.r1 - ch.r0, At.shape[0]))
                grad_b[ch.r0:ch.r1] = G @ At
        grad_at = None
        if need_a:  # rows of At_cat: Gᵀ[c0:c1] @ B_cat, through the column-ordered pattern
            grad_at = torch.zeros_like(At, memory_format=torch.contiguous_format)
            for ch in layout.col_chunks:
                values = gd_all.index_select(0, layout.perm[ch.t0:ch.t1])
                G = _csr(ch.ccol, layout.rows_by_col[ch.t0:ch.t1], values, (ch.c1 - ch.c0, B.shape[0]))
                grad_at[ch.c0:ch.c1] = G @ B
        return grad_b, grad_at, None, None, None, None


class FusedCoordinates:
    """The static layout of one group of coordinate-basis modules (same device, dtype and rank r).

    `members` are BoundModule-like objects (`.target` with A (r, in), B (out, r), scale; `.block` a
    CoordinateBlock). Calling it gives the per-module terms, in member order.
    """

    def __init__(self, members: Sequence[Any], device: torch.device, dtype: torch.dtype, split: str,
                 chunk: int = DEFAULT_CHUNK) -> None:
        self.members, self.dtype, self.hard = list(members), dtype, split == "hard"
        shapes = [m.target.shape for m in self.members]  # (out, in)
        self.b_order = sorted(range(len(shapes)), key=lambda i: shapes[i][0])  # B-order: by out size
        self.a_order = sorted(range(len(shapes)), key=lambda i: shapes[i][1])  # A-order: by in size
        b_start, a_start = _starts([shapes[i][0] for i in self.b_order]), _starts([shapes[i][1] for i in self.a_order])
        self.b_classes = _classes([shapes[i][0] for i in self.b_order])  # (first row, count, out)
        self.a_classes = _classes([shapes[i][1] for i in self.a_order])  # (first row, count, in)
        rows, cols = self._coordinates(shapes, b_start, a_start)  # (|S|,) int64 each, rows ascending
        n_rows, n_cols, size = b_start[-1], a_start[-1], int(rows.numel())
        index_dtype = torch.int64 if max(n_rows, n_cols, size) >= 2**31 - 1 else torch.int32
        crow = _pointers(rows, n_rows)  # (ΣN_out + 1,)
        self.perm = torch.argsort(cols, stable=True)  # (|S|,) column order -> row order
        ccol = _pointers(cols[self.perm], n_cols)  # (ΣN_in + 1,)
        self.size, self.chunk = size, chunk
        self.row_chunks = self._row_chunks(crow, device, index_dtype)
        self.col_chunks = [_ColChunk(c0, c1, int(ccol[c0]), int(ccol[c1]), (ccol[c0:c1 + 1] - ccol[c0]).to(device, index_dtype))
                           for c0, c1 in _spans(ccol, chunk) if ccol[c1] > ccol[c0]]
        self.max_chunk = max([c.s1 - c.s0 for c in self.row_chunks], default=0)
        self.cols = cols.to(device, index_dtype)
        self.rows_by_col = rows[self.perm].to(device, index_dtype)
        self.perm = self.perm.to(device, index_dtype)
        self.fisher = torch.cat([self.members[i].block.fisher.detach().cpu().float() for i in self.b_order]).to(device)
        blocks = [self.members[i].block for i in self.b_order]
        self.n_modules = len(blocks)
        self.inv_norm, self.kappa, self.inv_size = (  # (n,) each, B-order
            torch.tensor(v, dtype=torch.float64).to(device, dtype)
            for v in zip(*[(1.0 / float(b.norm), float(b.kappa), 1.0 / max(b.size, 1)) for b in blocks]))
        scales = [float(self.members[i].target.scale) for i in self.b_order]
        self.scale: Any = scales[0] if len(set(scales)) == 1 else torch.tensor(
            [s for s, i in zip(scales, self.b_order) for _ in range(shapes[i][0])], dtype=torch.float64
        ).to(device, dtype).unsqueeze(1)  # (ΣN_out, 1)
        a_pos = {i: p for p, i in enumerate(self.a_order)}
        self.a_to_b = torch.tensor([a_pos[i] for i in self.b_order], dtype=torch.int64, device=device)  # (n,)
        self.member_to_b = torch.argsort(torch.tensor(self.b_order, dtype=torch.int64)).to(device)  # (n,)

    def _coordinates(self, shapes, b_start, a_start) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = [], []
        self.module_ends = [0]  # coordinate position where each module (B-order) ends
        for p, i in enumerate(self.b_order):
            flat = self.members[i].block.index.detach().cpu().long()  # sorted row-major
            n_cols = shapes[i][1]
            r_ = torch.div(flat, n_cols, rounding_mode="floor")
            rows.append(r_ + b_start[p])
            cols.append(flat - r_ * n_cols + a_start[self.a_order.index(i)])
            self.module_ends.append(self.module_ends[-1] + flat.numel())
        empty = torch.zeros(0, dtype=torch.int64)
        return (torch.cat(rows) if rows else empty), (torch.cat(cols) if cols else empty)

    def _row_chunks(self, crow: torch.Tensor, device, index_dtype) -> list[_RowChunk]:
        ends = torch.tensor(self.module_ends, dtype=torch.int64)  # (n + 1,)
        chunks = []
        for r0, r1 in _spans(crow, self.chunk):
            s0, s1 = int(crow[r0]), int(crow[r1])
            if s1 == s0:
                continue
            lo = int(torch.searchsorted(ends, s0, right=True)) - 1  # module holding coordinate s0
            hi = int(torch.searchsorted(ends, s1 - 1, right=True)) - 1  # module holding coordinate s1 − 1
            ids = torch.arange(lo, hi + 1)
            counts = ends[ids + 1].clamp(max=s1) - ends[ids].clamp(min=s0)
            chunks.append(_RowChunk(r0, r1, s0, s1, (crow[r0:r1 + 1] - s0).to(device, index_dtype),
                                    ids.to(device), counts.to(device)))
        return chunks

    def nbytes(self) -> int:
        """Bytes of the per-coordinate cache (column, Fisher, column-order permutation and row)."""
        return sum(t.numel() * t.element_size() for t in (self.cols, self.fisher, self.perm, self.rows_by_col))

    def __call__(self, beta: float, tau: float, eps: float, detail: bool = False) -> GroupTerms:
        targets = [m.target for m in self.members]
        B = torch.cat([targets[i].B for i in self.b_order], 0).to(self.dtype)  # (ΣN_out, r)
        B = B * self.scale
        At = torch.cat([targets[i].A.t() for i in self.a_order], 0).to(self.dtype)  # (ΣN_in, r)
        gram_b = _grams(B, self.b_classes)  # (n, r, r) B-order
        gram_a = _grams(At, self.a_classes).index_select(0, self.a_to_b)  # (n, r, r) B-order
        dw_sq = (gram_b * gram_a).sum(dim=(1, 2))  # (n,) ‖s B A‖²_F
        per, glob, more, amax = _FusedSums.apply(B, At, self, float(beta), float(tau), bool(detail))
        s_m, s_mm = per[:, 0], per[:, 1]  # Σ m d², Σ m(1−m) d²
        l_t = (dw_sq - (s_m + s_mm)).clamp(min=0)  # ‖ΔW_T‖² = ‖ΔW‖² − Σ (2m − m²) d²
        a_sq = s_m - s_mm  # ‖ΔW_A‖² = Σ m² d²
        e_geo = s_mm * s_mm / (a_sq * l_t + eps)
        back = self.member_to_b
        vectors = (t.index_select(0, back) for t in (l_t, e_geo, dw_sq.detach(), amax))
        l_t, e_geo, dw_sq, amax = vectors
        return GroupTerms(glob[0], l_t, glob[1], e_geo, glob[2].detach(), dw_sq, amax,
                          more.index_select(0, back) if detail else None)


def _pointers(sorted_ids: torch.Tensor, n: int) -> torch.Tensor:
    """CSR pointers (n + 1,) int64 of ascending ids in [0, n)."""
    out = torch.zeros(n + 1, dtype=torch.int64)
    out[1:] = torch.bincount(sorted_ids, minlength=n).cumsum(0)
    return out


def _spans(pointers: torch.Tensor, chunk: int) -> list[tuple[int, int]]:
    """Consecutive [lo, hi) ranges of rows holding ≈ `chunk` coordinates each (a row is never split)."""
    n, spans, lo = pointers.numel() - 1, [], 0
    while lo < n:
        hi = int(torch.searchsorted(pointers, int(pointers[lo]) + chunk, right=True)) - 1
        hi = min(max(hi, lo + 1), n)
        spans.append((lo, hi))
        lo = hi
    return spans


def _starts(sizes: list[int]) -> list[int]:
    out = [0]
    for s in sizes:
        out.append(out[-1] + s)
    return out


def _classes(sizes: list[int]) -> list[tuple[int, int, int]]:
    """Runs of equal sizes in a sorted list: (first row, count, size)."""
    runs: list[tuple[int, int, int]] = []
    row = 0
    for s in sizes:
        if runs and runs[-1][2] == s:
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, s)
        else:
            runs.append((row, 1, s))
        row += s
    return runs


def _grams(X: torch.Tensor, classes: list[tuple[int, int, int]]) -> torch.Tensor:
    """XᵀX of every module block of X (ΣN, r), batched per run of equal shapes: (n, r, r)."""
    out = []
    for first, count, size in classes:
        x = X[first:first + count * size].view(count, size, X.shape[1])  # (count, size, r)
        out.append(torch.bmm(x.transpose(1, 2), x))  # (count, r, r)
    return out[0] if len(out) == 1 else torch.cat(out, 0)
