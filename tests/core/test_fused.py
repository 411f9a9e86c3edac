"""The fused coordinate path (one sparse product per device/dtype/rank group) against the dense float64 reference.

Covers what the per-module tests in test_penalty.py do not vary: several chunks of rows and columns, modules
of different ranks and scales (several groups, per-row scales), modules in different dtypes, empty modules
inside a group, and the cache's bytes per protected coordinate.
"""

from __future__ import annotations

import pytest
import torch

import tiny
from agl_core.fused import FusedCoordinates
from agl_core.penalty import AGLPenalty
from reference import coordinate_blocks, lora_factors, reference
from test_penalty import TERMS, all_shapes, assert_rel, compare, config, empty, grads, make_penalty

TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def model_with(dtype=torch.float64, **kw):
    return tiny.tiny_lora(tiny.tiny_llama(0), targets=TARGETS, seed=0, **kw).to(dtype)


def blocks(model, rho=0.05, budget="global"):
    return coordinate_blocks(all_shapes(model), rho=rho, budget=budget, seed=2)


@pytest.mark.parametrize("chunk", [1, 37, 1000])
@pytest.mark.parametrize("split,budget", [("soft", "global"), ("hard", "per_module"), ("soft", "per_module")])
def test_chunked_fused_path_matches_reference(chunk, split, budget):
    model = model_with()
    cfg = config(split=split, budget=budget)
    pen = make_penalty(model, blocks(model, budget=budget), cfg, chunk_size=chunk)
    res = pen(1, per_module=True)
    ref = reference(lora_factors(model), blocks(model, budget=budget), cfg, scale=cfg.lambda_scale(1))
    params = [t for f in lora_factors(model).values() for t in f[:2]]
    for k in TERMS + ("protected_share", "max_abs_dw_s"):
        assert_rel(getattr(res, k), ref[k], 1e-10, k)
    for k in TERMS:
        for g, gr in zip(grads(getattr(res, k), params), grads(ref[k], params)):
            assert_rel(g, gr, 1e-10, f"grad {k}")
    (_, group), = pen._groups()
    if chunk == 1:  # one row per chunk: many chunks on both sides
        assert len(group.row_chunks) > 50 and len(group.col_chunks) > 50


@pytest.mark.parametrize("detail", [False, True])
@pytest.mark.parametrize("mode", ["segments", "broadcast"])
def test_per_module_paths_match_reference(mode, detail):
    """The per-module sums and broadcasts a GPU uses (float64 segment_reduce, repeat_interleave), forced on
    the CPU layout ("segments"), and the CPU's repeat_interleave fallback for chunks with many runs."""
    model = model_with(torch.float32)
    cfg = config()
    pen = make_penalty(model, blocks(model), cfg, chunk_size=40)
    (_, group), = pen._groups()
    assert group.loop_sums and group.run_loop_max > 0  # the CPU defaults
    looped = pen(per_module=detail)
    if mode == "segments":
        group.loop_sums, group.run_loop_max = False, -1
    else:
        group.run_loop_max = 0
    res = pen(per_module=detail)
    ref = reference(lora_factors(model, leaves=True), blocks(model), cfg)
    params = [t for f in lora_factors(model).values() for t in f[:2]]
    for k in TERMS:
        assert_rel(getattr(res, k), ref[k], 1e-5, k)
        assert_rel(getattr(res, k), getattr(looped, k), 1e-6, k)
        for g, gl in zip(grads(getattr(res, k), params), grads(getattr(looped, k), params)):
            assert_rel(g, gl, 1e-6, f"grad {k}")
    if detail:
        for name, row in res.per_module.items():
            for k in ("L_A", "E_rie", "on_support", "max_abs_dw_s"):
                assert row[k] == pytest.approx(looped.per_module[name][k], rel=1e-6, abs=1e-30)


def test_different_ranks_and_scales_form_groups_and_match_reference():
    model = model_with(rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 3, "up_proj": 13},
                       use_rslora=True)
    pen = make_penalty(model, blocks(model), config())
    ranks = sorted(len(idx) for idx, _ in pen._groups())
    assert ranks == [2, 2, 6]  # r=2 (q), r=4 (k, v, up), r=6 (down), two layers each
    scales = {s for _, _, s in lora_factors(model).values()}
    assert len(scales) >= 3
    compare(model, blocks(model), config())


def test_bf16_factors_with_different_scales_are_scaled_in_float32():
    """bf16 LoRA factors are computed in float32: with per-module scales (alpha_pattern) each B is copied into
    the float32 concatenation before it is scaled, so no bf16 rounding enters (a bf16 product was off by ~2e-5)."""
    model = model_with(torch.bfloat16, alpha_pattern={"v_proj": 3, "up_proj": 13})
    assert len({s for _, _, s in lora_factors(model).values()}) > 1
    bl, cfg = blocks(model), config()
    res = make_penalty(model, bl, cfg)(1)
    ref = reference(lora_factors(model, leaves=True), bl, cfg, scale=cfg.lambda_scale(1))
    for k in ("L_A", "E_rie", "E_geo"):
        assert_rel(getattr(res, k), ref[k], 1e-6, k)


def test_modules_in_different_dtypes_use_separate_groups():
    model = model_with()
    for name, module in model.named_modules():
        if name.endswith("mlp.up_proj") or name.endswith("self_attn.k_proj"):
            module.float()  # these LoRA factors in float32, the rest float64
    pen = make_penalty(model, blocks(model), config())
    assert len(pen._groups()) == 2
    res = pen(per_module=True)
    ref = reference(lora_factors(model, leaves=True), blocks(model), config())
    for k in TERMS:
        assert_rel(getattr(res, k), ref[k], 1e-5, k)


def test_empty_modules_inside_a_group():
    model = model_with()
    bl = blocks(model)
    names = [n for n in bl if n.endswith(TARGETS)]
    for n in names[::3]:
        bl[n] = empty(bl[n].shape)
    res, ref = compare(model, bl, config())
    for n in names[::3]:
        assert res.per_module[n]["L_A"] == 0.0 and res.per_module[n]["E_rie"] == 0.0


def test_persistent_buffers_hold_no_stale_values():
    """The gradient workspaces are not zeroed between calls (the Gram part writes every row, the sparse
    products add into it; here the trailing up/down_proj modules are empty, so the last chunk ends on rows
    without coordinates), and a backward whose concatenations were refilled by a later call refills them."""
    model = model_with()
    bl = blocks(model)
    for n in [n for n in bl if n.endswith(("up_proj", "down_proj"))]:
        bl[n] = empty(bl[n].shape)
    pen = make_penalty(model, bl, config(), chunk_size=7)
    (_, group), = pen._groups()
    last = group.row_chunks[-1]
    assert len(group.row_chunks) > 5 and last.crow[-1] == last.crow[-2]  # ends on rows without coordinates
    ref = reference(lora_factors(model), bl, config(), scale=config().lambda_scale(1))
    params = [t for f in lora_factors(model).values() for t in f[:2]]
    first = pen(1)
    assert all(buf.shape[1] == 8 for buf in group.concatenations)  # r = 4 padded with zero columns on a CPU
    for buf in group.workspaces():
        buf.fill_(float("nan"))
    later = pen(1)  # refills the concatenations ...
    for buf in group.concatenations:
        buf[:, :params[0].shape[0]].fill_(float("nan"))  # ... and stands for a call that left other values there
    for res in (first, later, None):
        res = res if res is not None else pen(1)
        for k in TERMS:
            for g, gr in zip(grads(getattr(res, k), params), grads(ref[k], params)):
                assert_rel(g, gr, 1e-10, f"grad {k}")
        for buf in group.workspaces():
            buf.fill_(float("nan"))
    grad = torch.autograd.grad(pen(1).total, params)
    assert all(g.is_contiguous() and g.data_ptr() not in {b.data_ptr() for b in group.workspaces()} for g in grad)


def test_frozen_factors_in_a_group():
    """LoRA-FA-style frozen A factors in some modules, frozen B in others: the trainable factors' gradients
    still equal the reference, and the frozen ones get none."""
    model = model_with()
    for name, p in model.named_parameters():
        if ("lora_A" in name and "mlp" in name) or ("lora_B" in name and "q_proj" in name):
            p.requires_grad_(False)
    bl, cfg = blocks(model), config()
    ref = reference(lora_factors(model), bl, cfg, scale=cfg.lambda_scale(1))
    factors = [t for f in lora_factors(model).values() for t in f[:2]]
    trainable = [t for t in factors if t.requires_grad]
    assert 0 < len(trainable) < len(factors)
    res = make_penalty(model, bl, cfg)(1)
    for k in TERMS:
        for g, gr in zip(grads(getattr(res, k), trainable), grads(ref[k], trainable)):
            assert_rel(g, gr, 1e-10, f"grad {k}")
    res.total.backward()
    assert all((t.grad is None) != t.requires_grad for t in factors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the fused path's GPU kernels)")
@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_fused_path_on_cuda_matches_reference(dtype, rel):
    """On a GPU: float64 segment sums and repeat_interleave broadcasts, cuSPARSE SDDMM / SpMM added into the
    workspaces, no rank padding; two calls (the second reuses the buffers) against the float64 reference on
    the CPU."""
    model = model_with(dtype)
    bl, cfg = blocks(model), config()
    leaves = lora_factors(model, leaves=True)  # float64 CPU copies
    ref = reference(leaves, bl, cfg, scale=cfg.lambda_scale(1))
    ref_params = [t for f in leaves.values() for t in f[:2]]
    model.to("cuda")
    pen = make_penalty(model, bl, cfg, chunk_size=37)
    params = [t for f in lora_factors(model).values() for t in f[:2]]
    for _ in range(2):
        res = pen(1)
        for k in TERMS:
            assert_rel(getattr(res, k), ref[k], rel, k)
            for g, gr in zip(grads(getattr(res, k), params), grads(ref[k], ref_params)):
                assert_rel(g, gr, rel, f"grad {k}")
    (_, group), = pen._groups()
    assert group.device.type == "cuda" and not group.loop_sums and len(group.row_chunks) > 5
    assert group.concatenations[0].shape[1] == 4  # r = 4, not padded on a GPU


def test_all_modules_empty_gives_only_the_task_term():
    model = model_with()
    bl = {n: empty(s) for n, s in all_shapes(model).items()}
    res, _ = compare(model, bl, config(lambda_t=0.3))
    assert float(res.L_A.detach()) == 0.0 and float(res.L_T.detach()) > 0


def test_cache_is_28_bytes_per_coordinate_and_layout_is_consistent():
    model = model_with(torch.float32)
    pen = make_penalty(model, blocks(model), config(), chunk_size=50)
    (_, group), = pen._groups()
    assert isinstance(group, FusedCoordinates) and group.size == pen.num_protected
    assert group.nbytes() == 28 * group.size  # 3 int32 indices + 4 float32 coefficients
    assert group.coef.dtype == torch.float32  # m, m(1−m), F̂m², q
    assert group.cols.dtype == torch.int32 and group.perm.dtype == torch.int32
    covered = sorted((c.s0, c.s1) for c in group.row_chunks)
    assert covered[0][0] == 0 and covered[-1][1] == group.size
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))  # row chunks tile the coordinates
    assert sum(c.t1 - c.t0 for c in group.col_chunks) == group.size


def test_factors_on_different_devices_are_a_clear_error():
    from torch import nn

    from agl_core.blocks import CoordinateBlock
    from agl_core.mask import FisherMask

    layer = nn.Module()  # a PEFT-shaped LoRA layer whose B sits on another device (meta) than A
    layer.base_layer = nn.Linear(6, 5, bias=False)
    layer.lora_A = nn.ModuleDict({"default": nn.Linear(6, 2, bias=False)})
    layer.lora_B = nn.ModuleDict({"default": nn.Linear(2, 5, bias=False, device="meta")})
    layer.scaling, layer.active_adapters = {"default": 1.0}, ["default"]
    model = nn.Module()
    model.proj = layer
    block = CoordinateBlock((5, 6), torch.tensor([0, 7, 29], dtype=torch.int32), torch.ones(3), 1.0, 0.5)
    cfg = config()
    pen = AGLPenalty(model, FisherMask(blocks={"proj": block}, config=cfg), cfg, check_fingerprint=False)
    with pytest.raises(ValueError, match="'proj' are on different devices"):
        pen()
