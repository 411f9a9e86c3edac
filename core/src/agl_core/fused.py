"""Fused coordinate-basis penalty: every module of one device/dtype/rank in one sparse product, Grams batched.

Layout (built once per group, re-built when the LoRA weights change device or dtype):
  B_cat  (ΣN_out, r)  the modules' B factors stacked by rows, ordered by out size (same-shaped B's adjacent),
                      times each module's scale s where the scales differ, so ΔW_j = B_cat[row_j] · At_cat[col_j]
                      (one scale shared by the group is applied inside the products instead);
  At_cat (ΣN_in, r)   the modules' Aᵀ stacked by rows, ordered by in size;
  the protected coordinates as one sparse CSR pattern of the block-diagonal (ΣN_out, ΣN_in) ΔW: module by
  module (B order), row-major inside a module, so rows ascend and each module is one contiguous run.
B_cat, At_cat and the two gradient workspaces (2 (ΣN_out + ΣN_in) r floats, r < 8 padded to 8 on a CPU) are
persistent buffers of the layout, refilled each call: on a CPU a fresh buffer of tens of MB costs a page fault
per 4 KiB every step.
Static per-coordinate coefficients are computed once per layout (float64, stored in the compute dtype) as
one (4, |S|) table: m, m(1−m), F̂m² and q = m(1−m)/|S_k|. Forward: ΔW_S = sampled_addmm(pattern, B_cat,
At_catᵀ) (an SDDMM, cost |S|·r); the terms are the table's rows times ΔW_S², summed: the global ones by one
mv / dot per chunk, the per-module ones (Σ m d², Σ m(1−m) d²) by one cascade sum per module run of a chunk on
a CPU, a float64 segment_reduce elsewhere; ‖ΔW‖² per module from batched Grams. Backward: the Grams'
gradient is written into the workspaces (every row); ∂/∂ΔW_S is the table times a per-module vector, plus a
constant and one term in v (see below), times ΔW_S: four passes; G @ At_cat with G the CSR matrix of those
values is added into ∂B_cat, Gᵀ @ B_cat into ∂At_cat through a second, column-ordered CSR copy of the
pattern; each factor gets a fresh copy of its rows.
Everything runs in chunks of whole rows (columns) of ≈ `chunk` coordinates (default 2¹⁸ on a CPU, where a
chunk's temporaries stay in the L2/L3 caches, 2²⁰ on other devices): the working set is O(chunk · r). The
cache is 28 bytes per protected coordinate in float32 (int32 column, column-order permutation and row; four
coefficients), plus 8 bytes (ΔW_S and v = σ(2 + (1 − σ)|ΔW_S|), σ = σ(|ΔW_S| − τ)) kept between forward and
backward; nothing of size out × in is ever built.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK = 1 << 20  # coordinates per chunk of the fused path on a GPU (or any non-CPU device)
CPU_CHUNK = 1 << 18  # on a CPU (measured in docs/performance.md: 2¹⁶ to 2¹⁹ within ~15 %, 2¹⁸ fastest when quiet)
# torch's CPU SDDMM runs a scalar loop below 8 columns: r = 4 took 5x as long as r = 8 (docs/performance.md), so
# on a CPU the concatenations of a rank-r group with r < 8 get 8 − r zero columns (exact: they add 0 everywhere).
CPU_MIN_WIDTH = 8


def default_chunk(device: torch.device) -> int:
    return CPU_CHUNK if torch.device(device).type == "cpu" else DEFAULT_CHUNK

# Outputs of the fused function, sums over S of a coefficient times ΔW_j²:
#   per module (n, 2):  Σ m d² and Σ m(1−m) d²  (‖ΔW_A‖² = Σm d² − Σm(1−m) d², ‖ΔW‖² − ‖ΔW_T‖² = Σm d² + Σm(1−m) d²)
#   global (3,):        Σ F̂ m² d² (L_A), Σ η m(1−m) d² / |S_k| (E_rie), Σ d² (energy on S)
#   detail (n, 3):      the global three per module, only when asked for (diagnostics, not differentiable)
class GroupTerms(NamedTuple):
    """One group's terms: L_A, E_rie, on_support summed over the group (0-dim); the rest per module (n,),
    in member order, except max_abs_dw_s: per module with `detail`, else (1,), the group's maximum.
    `detail` is None, or (n, 3) per-module [L_A, E_rie, on_support] (detached)."""

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
    runs: tuple  # (k + 1,) Python ints: where each module's run starts inside the chunk, then c
    module_ids: tuple  # (k,) Python ints: the same ids as `modules`


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


def _run_sums(ch: _RowChunk, values: torch.Tensor, loop: bool) -> torch.Tensor:
    """Sums of `values` (j, c) over each module's run inside the chunk, as (k, j) float64.

    `loop` (the default on a CPU): one cascade sum per run, a Python loop over the chunk's runs, which costs
    less there than segment_reduce's sequential kernel and keeps float32 sums accurate; else one float64
    segment_reduce (one kernel launch on a GPU).
    """
    if loop:
        runs = ch.runs
        return torch.stack([values[:, a:b].sum(1) for a, b in zip(runs, runs[1:])]).to(torch.float64)
    return torch.segment_reduce(values.t().to(torch.float64), "sum", lengths=ch.counts, axis=0)


def _run_max(ch: _RowChunk, values: torch.Tensor) -> torch.Tensor:
    """Maxima of `values` (c,) ≥ 0 over each module's run inside the chunk (k,); 0 for an empty run."""
    return torch.segment_reduce(values, "max", lengths=ch.counts, axis=0, unsafe=True, initial=0)


RUN_LOOP_MAX = 64  # on a CPU, chunks with at most this many module runs get one mv per run (else repeat_interleave)


class _GroupSums(torch.autograd.Function):
    """One group's (‖ΔW‖² (n,), per (n, 2), glob (3,), detail (n, 3), max_S |ΔW| (n,) or (1,)), B-order.

    Inputs after the settings: every module's B factor (B-order), then every module's A factor (A-order).
    The forward copies them into the layout's persistent concatenations (`FusedCoordinates.fill`: no fresh
    buffer of tens of MB, and so no page faults, per step); the backward writes ∂B_cat and ∂At_cat into the
    layout's persistent workspaces — the Gram part first, which writes every row, then the sparse products
    added in place — and returns a fresh gradient per factor. A backward that finds the concatenations
    refilled by a later call (two penalties before one backward) refills them from its saved factors.
    The static coefficients (m, m(1−m), F̂m², m(1−m)/|S_k|) come from the layout's cache; ΔW_S and the
    Riemannian term's derivative factor v of every chunk are kept for backward (8 bytes per coordinate).
    ‖ΔW‖² = s²⟨BᵀB, AAᵀ⟩ per module from Grams batched per run of equal shapes, with a hand-written backward
    (∂B_k = 2 g_k s² B_k A_kA_kᵀ, ∂A_kᵀ = 2 g_k s² A_kᵀ B_kᵀB_k: one bmm per run), where autograd's bmm
    backward through transposed views is several times slower on a CPU.
    """

    @staticmethod
    def forward(ctx, layout, scale, beta, tau, detail, *factors):
        B, At = layout.fill(factors)
        gram_b = _grams(B, layout.b_classes)  # (n, r, r) B-order
        gram_a = _grams(At, layout.a_classes)  # (n, r, r) A-order
        dw_sq = (gram_b * gram_a.index_select(0, layout.a_to_b)).sum(dim=(1, 2)) * (scale * scale)
        per, glob, more, amax, ctx.saved_d, ctx.saved_v = _sums_forward(B, At, layout, scale, beta, tau, detail)
        ctx.save_for_backward(*factors)
        ctx.fill, ctx.grams = layout.fills, (gram_b, gram_a)
        ctx.layout, ctx.scale, ctx.beta = layout, scale, beta
        ctx.mark_non_differentiable(more, amax)
        return dw_sq, per, glob, more, amax

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_dw, grad_per, grad_glob, _grad_more, _grad_amax):  # (n,), (n, 2), (3,)
        layout, scale, n = ctx.layout, ctx.scale, ctx.layout.n_modules
        factors = ctx.saved_tensors
        need_b, need_a = any(ctx.needs_input_grad[5:5 + n]), any(ctx.needs_input_grad[5 + n:])
        B, At = layout.fill(factors) if layout.fills != ctx.fill else layout.concatenations
        grad_b, grad_at = layout.workspaces()
        gram_b, gram_a = ctx.grams
        g2 = (2 * scale * scale * grad_dw).view(-1, 1, 1)
        if need_b:  # rows of module k: 2 g_k s² B_k (A_kA_kᵀ)
            _times_grams(B, layout.b_classes, gram_a.index_select(0, layout.a_to_b) * g2, out=grad_b)
        if need_a:  # rows of module k in A-order: 2 g_k s² A_kᵀ (B_kᵀB_k)
            _times_grams(At, layout.a_classes, (gram_b * g2).index_select(0, layout.b_to_a), out=grad_at)
        _sums_backward(B, At, layout, scale, ctx.beta, ctx.saved_d, ctx.saved_v, grad_per, grad_glob,
                       grad_b if need_b else None, grad_at if need_a else None)
        return (None,) * 5 + layout.split_grads(grad_b if need_b else None, grad_at if need_a else None, factors,
                                                ctx.needs_input_grad[5:])


def _sums_forward(B, At, layout, scale, beta, tau, detail):
    """(per, glob, detail, amax, ΔW_S per chunk, v per chunk) of the chunks; see _GroupSums.

    v = σ(2 + (1 − σ)|ΔW_S|) with σ = σ(|ΔW_S| − τ) is the Riemannian summand's derivative factor, kept for
    backward, which then needs no element-wise work beyond four passes.
    """
    n, f64 = layout.n_modules, torch.float64
    per = torch.zeros(n, 2, dtype=f64, device=B.device)
    more = torch.zeros(n if detail else 0, 3, dtype=f64, device=B.device)
    amax = torch.zeros(n if detail else 1, dtype=B.dtype, device=B.device)
    zeros = torch.zeros(layout.max_chunk, dtype=B.dtype, device=B.device)
    saved_d, saved_v, glob_parts = [], [], []
    for ch in layout.row_chunks:
        c, sl = ch.s1 - ch.s0, slice(ch.s0, ch.s1)
        coef = layout.coef[:, sl]  # (4, c): m, m(1−m), F̂m², q = m(1−m)/|S_k|
        pattern = _csr(ch.crow, layout.cols[sl], zeros[:c], (ch.r1 - ch.r0, At.shape[0]))
        d = torch.sparse.sampled_addmm(pattern, B[ch.r0:ch.r1], At.t(), beta=0.0, alpha=scale).values()  # ΔW_S
        d2 = d * d
        per.index_add_(0, ch.modules, _run_sums(ch, coef[:2] * d2, layout.loop_sums))  # Σ m d², Σ m(1−m) d²
        a = d.abs()
        if detail:
            top = torch.maximum(amax.index_select(0, ch.modules), _run_max(ch, a))
            amax.index_copy_(0, ch.modules, top)  # a chunk lists each module once
        else:
            torch.maximum(amax, a.amax(), out=amax)
        sig = torch.sigmoid_(torch.sub(a, tau))  # σ(|d| − τ)
        e = d2 * sig
        # Σ F̂m² d², Σ q d², Σ q σ d², Σ d² of ≤ one chunk: sums of non-negative terms, so a BLAS mv / dot (one pass;
        # ~1e-6 relative in float32) is enough here; the per-module sums above, which ‖ΔW_T‖² = ‖ΔW‖² − Σ (2m − m²) d²
        # subtracts, are cascade sums (~5e-8)
        glob_parts.append(torch.cat([torch.mv(coef[2:], d2), torch.dot(coef[3], e).view(1), d2.sum().view(1)]))
        if detail:
            rie = coef[3] * e.mul_(beta).add_(d2)  # (1 + β σ) q d²
            more.index_add_(0, ch.modules, _run_sums(ch, torch.stack([coef[2] * d2, rie, d2]), layout.loop_sums))
        saved_d.append(d)
        saved_v.append(torch.addcmul(a, sig, a, value=-1).add_(2).mul_(sig))  # σ (2 + (1 − σ)|d|)
    if glob_parts:
        sums = torch.stack(glob_parts).to(f64).sum(0)
        glob = torch.stack([sums[0], sums[1] + beta * sums[2], sums[3]])  # L_A, E_rie, energy on S
    else:
        glob = torch.zeros(3, dtype=f64, device=B.device)
    return per.to(B.dtype), glob.to(B.dtype), more.to(B.dtype), amax, saved_d, saved_v


def _sums_backward(B, At, layout, scale, beta, saved_d, saved_v, grad_per, grad_glob, grad_b, grad_at):
    """Adds the sparse part of ∂total/∂B_cat (∂At_cat) into grad_b (grad_at) in place (None: not needed)."""
    gd_all = torch.empty(layout.size, dtype=B.dtype, device=B.device)  # ∂total/∂ΔW_S (|S|,)
    g_la, g_rie, g_on = (float(v) for v in grad_glob.double().cpu())  # one sync per backward
    # ∂/∂d of Σ c d² is 2 c d; of Σ (1 + β σ(|d| − τ)) q d²: q d (2 + 2βσ + βσ(1 − σ)|d|) = q d (2 + β v).
    # So, with ΔW_S = s (B A)_S, ∂/∂(BA)_S =
    #     s d · [2 g_m,k m + 2 g_mm,k m(1−m) + 2 g_la F̂m² + 2 g_rie q + 2 g_on + β g_rie q v]:
    # the first four terms are the coefficient table times a per-module vector (one mv per run on a CPU).
    vecs = torch.stack([2 * grad_per[:, 0], 2 * grad_per[:, 1], grad_per.new_full((grad_per.shape[0],), 2 * g_la),
                        grad_per.new_full((grad_per.shape[0],), 2 * g_rie)], 1).mul_(scale).to(B.dtype)  # (n, 4)
    for ch, d, v in zip(layout.row_chunks, saved_d, saved_v):
        sl = slice(ch.s0, ch.s1)
        coef, gd, runs = layout.coef[:, sl], gd_all[sl], ch.runs
        if len(runs) - 1 <= layout.run_loop_max:
            for k, a, b in zip(ch.module_ids, runs, runs[1:]):
                torch.mv(coef[:, a:b].t(), vecs[k], out=gd[a:b])
        else:  # per-module values broadcast over the runs
            torch.mv(coef[2:].t(), vecs[0, 2:], out=gd)
            for j in (0, 1):
                per_coordinate = torch.repeat_interleave(vecs[:, j].index_select(0, ch.modules), ch.counts,
                                                         output_size=ch.s1 - ch.s0)
                gd.addcmul_(per_coordinate, coef[j])
        gd.add_(2 * g_on * scale).addcmul_(coef[3], v, value=beta * g_rie * scale).mul_(d)
        if grad_b is not None:  # rows of B_cat: += G[r0:r1] @ At_cat
            G = _csr(ch.crow, layout.cols[sl], gd, (ch.r1 - ch.r0, At.shape[0]))
            rows = grad_b[ch.r0:ch.r1]
            torch.addmm(rows, G, At, out=rows)
    if grad_at is not None:  # rows of At_cat: += Gᵀ[c0:c1] @ B_cat, through the column-ordered pattern
        for ch in layout.col_chunks:
            values = gd_all.index_select(0, layout.perm[ch.t0:ch.t1])
            G = _csr(ch.ccol, layout.rows_by_col[ch.t0:ch.t1], values, (ch.c1 - ch.c0, B.shape[0]))
            rows = grad_at[ch.c0:ch.c1]
            torch.addmm(rows, G, B, out=rows)


class FusedCoordinates:
    """The static layout of one group of coordinate-basis modules (same device, dtype and rank r).

    `members` are BoundModule-like objects (`.target` with A (r, in), B (out, r), scale; `.block` a
    CoordinateBlock). Calling it gives the per-module terms, in member order.
    """

    def __init__(self, members: Sequence[Any], device: torch.device, dtype: torch.dtype, split: str,
                 chunk: Optional[int] = None) -> None:
        chunk = default_chunk(device) if chunk is None else chunk
        self.loop_sums = torch.device(device).type == "cpu"  # per-module sums: see _run_sums
        self.run_loop_max = RUN_LOOP_MAX if self.loop_sums else -1  # per-module broadcasts: see _sums_backward
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
        blocks = [self.members[i].block for i in self.b_order]
        self.n_modules = len(blocks)
        self.coef = _static_coefficients(blocks, self.hard, device, dtype)  # (4, |S|)
        scales = [float(self.members[i].target.scale) for i in self.b_order]
        # One scale for the whole group: applied as the products' alpha. Else each B is scaled as it is copied
        # into B_cat (row_scales, B-order) and the products use alpha = 1.
        self.alpha = scales[0] if len(set(scales)) == 1 else 1.0
        self.row_scales = None if len(set(scales)) == 1 else scales
        self.b_start, self.a_start = b_start, a_start
        self.device = torch.device(device)
        self.fills = 0  # how often fill() has run: a backward compares it with its forward's
        self._buffers: dict[str, torch.Tensor] = {}
        a_pos = {i: p for p, i in enumerate(self.a_order)}
        self.a_to_b = torch.tensor([a_pos[i] for i in self.b_order], dtype=torch.int64, device=device)  # (n,)
        self.b_to_a = torch.argsort(self.a_to_b)  # (n,): B-order position of each A-order module
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
            runs = tuple([0] + counts.cumsum(0).tolist())
            chunks.append(_RowChunk(r0, r1, s0, s1, (crow[r0:r1 + 1] - s0).to(device, index_dtype),
                                    ids.to(device), counts.to(device), runs, tuple(ids.tolist())))
        return chunks

    def _buffer(self, name: str, rows: int, width: int) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[1] != width:  # zeros: the padding columns of B_cat and At_cat stay 0
            buf = self._buffers[name] = torch.zeros(rows, width, dtype=self.dtype, device=self.device)
        return buf

    def fill(self, factors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies the factors (every B in B-order, then every A in A-order) into the persistent B_cat (ΣN_out, w),
        each B times its scale where the scales differ, and At_cat (ΣN_in, w); returns the two. w = r, or 8 on a
        CPU where r < 8 (zero columns; see CPU_MIN_WIDTH)."""
        n, r = self.n_modules, factors[0].shape[1]
        width = max(r, CPU_MIN_WIDTH) if self.device.type == "cpu" else r
        B, At = self._buffer("B", self.b_start[-1], width), self._buffer("At", self.a_start[-1], width)
        with torch.no_grad():
            for p, f in enumerate(factors[:n]):
                rows = B[self.b_start[p]:self.b_start[p + 1], :r]
                rows.copy_(f)  # in the compute dtype first: fp16 / bf16 factors are scaled in float32
                if self.row_scales is not None:
                    rows.mul_(self.row_scales[p])
            for p, f in enumerate(factors[n:]):
                At[self.a_start[p]:self.a_start[p + 1], :r].copy_(f.t())
        self.fills += 1
        return B, At

    @property
    def concatenations(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._buffers["B"], self._buffers["At"]

    def workspaces(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The persistent (uninitialised) buffers that ∂B_cat and ∂At_cat are written into."""
        B, At = self.concatenations
        return self._buffer("grad_B", B.shape[0], B.shape[1]), self._buffer("grad_At", At.shape[0], At.shape[1])

    def split_grads(self, grad_b: Optional[torch.Tensor], grad_at: Optional[torch.Tensor],
                    factors: Sequence[torch.Tensor], needs: Sequence[bool]) -> tuple:
        """A fresh gradient per factor that needs one (never a view of the workspaces), in the factor's dtype and
        layout; None for the others."""
        n, r, out = self.n_modules, factors[0].shape[1], []
        for p, f in enumerate(factors[:n]):
            if grad_b is None or not needs[p]:
                out.append(None)
                continue
            rows = grad_b[self.b_start[p]:self.b_start[p + 1], :r]  # ∂/∂(s_k B_k)
            if self.row_scales is None:
                out.append(rows.to(f.dtype, memory_format=torch.contiguous_format, copy=True))
            else:
                out.append(torch.mul(rows, self.row_scales[p]).to(f.dtype))
        for p, f in enumerate(factors[n:]):
            if grad_at is None or not needs[n + p]:
                out.append(None)
                continue
            rows = grad_at[self.a_start[p]:self.a_start[p + 1], :r]  # (in, r) → A's (r, in)
            out.append(rows.t().to(f.dtype, memory_format=torch.contiguous_format, copy=True))
        return tuple(out)

    def nbytes(self) -> int:
        """Bytes of the per-coordinate cache (column, column-order permutation and row; m, m(1−m), F̂m², q)."""
        return sum(t.numel() * t.element_size()
                   for t in (self.cols, self.perm, self.rows_by_col, self.coef))

    def __call__(self, beta: float, tau: float, eps: float, detail: bool = False) -> GroupTerms:
        targets = [m.target for m in self.members]
        factors = [targets[i].B for i in self.b_order] + [targets[i].A for i in self.a_order]
        dw_sq, per, glob, more, amax = _GroupSums.apply(self, self.alpha, float(beta), float(tau), bool(detail),
                                                        *factors)  # ‖ΔW‖² (n,) B-order; Σ over S
        s_m, s_mm = per[:, 0], per[:, 1]  # Σ m d², Σ m(1−m) d²
        l_t = (dw_sq - (s_m + s_mm)).clamp(min=0)  # ‖ΔW_T‖² = ‖ΔW‖² − Σ (2m − m²) d²
        a_sq = s_m - s_mm  # ‖ΔW_A‖² = Σ m² d²
        e_geo = s_mm * s_mm / (a_sq * l_t + eps)
        back = self.member_to_b
        l_t, e_geo, dw_sq = (t.index_select(0, back) for t in (l_t, e_geo, dw_sq.detach()))
        amax = amax.index_select(0, back) if detail else amax
        return GroupTerms(glob[0], l_t, glob[1], e_geo, glob[2].detach(), dw_sq, amax,
                          more.index_select(0, back) if detail else None)


def _static_coefficients(blocks: Sequence[Any], hard: bool, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(4, |S|) rows m, m(1−m), F̂ m², m(1−m)/max(|S_k|, 1) in `dtype`, computed in float64 once per layout."""
    parts = []
    for b in blocks:
        f = b.fisher.detach().to("cpu", torch.float64)  # (|S_k|,)
        m = torch.ones_like(f) if hard else f / (f + float(b.kappa))
        mm = m - m * m
        parts.append(torch.stack([m, mm, f / float(b.norm) * m * m, mm / max(b.size, 1)]))  # (4, |S_k|)
    table = torch.cat(parts, 1) if parts else torch.zeros(4, 0, dtype=torch.float64)
    return table.to(device, dtype).contiguous()


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


def _times_grams(X: torch.Tensor, classes: list[tuple[int, int, int]], mats: torch.Tensor,
                 out: torch.Tensor) -> torch.Tensor:
    """Writes every module block X_k (size, r) of X (ΣN, r) times its own (r, r) matrix mats[k] into out (ΣN, r)."""
    k = 0
    for first, count, size in classes:
        x = X[first:first + count * size].view(count, size, X.shape[1])  # (count, size, r)
        torch.bmm(x, mats[k:k + count], out=out[first:first + count * size].view(count, size, X.shape[1]))
        k += count
    return out


def _grams(X: torch.Tensor, classes: list[tuple[int, int, int]]) -> torch.Tensor:
    """XᵀX of every module block of X (ΣN, r), batched per run of equal shapes: (n, r, r)."""
    out = []
    for first, count, size in classes:
        x = X[first:first + count * size].view(count, size, X.shape[1])  # (count, size, r)
        out.append(torch.bmm(x.transpose(1, 2), x))  # (count, r, r)
    return out[0] if len(out) == 1 else torch.cat(out, 0)
