"""The batched K-FAC path (one bmm set per device/dtype/rank/shape group) against the dense float64 reference.

test_penalty.py checks both K-FAC variants (k_out = 8 and k_out = all) per basis; here the grouping itself is
varied: several ranks and scales in one model, both variants mixed in one model, coordinate and K-FAC
modules together, hard and soft splits, gradients through the stacked factors of every module.
"""

from __future__ import annotations

import pytest
import torch

import tiny
from agl_core.fused_kfac import FusedKFAC
from reference import kfac_blocks, lora_factors
from test_penalty import compare, config, lora_shapes, make_penalty

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def model_with(**kw):
    return tiny.tiny_lora(tiny.tiny_llama(0), targets=TARGETS, seed=0, **kw).to(torch.float64)


def mixed_blocks(model, seed=3):
    """k_out = all on attention, k_out = 5 on the MLP, k_in = 3."""
    shapes = lora_shapes(model)
    attn = {n: s for n, s in shapes.items() if "self_attn" in n}
    mlp = {n: s for n, s in shapes.items() if "mlp" in n}
    return {**kfac_blocks(attn, k_in=3, k_out="all", seed=seed), **kfac_blocks(mlp, k_in=3, k_out=5, seed=seed + 1)}


def kfac_groups(pen):
    return [(idx, g) for idx, g in pen._groups() if isinstance(g, FusedKFAC)]


@pytest.mark.parametrize("split", ["soft", "hard"])
def test_mixed_kfac_variants_are_batched_by_shape_and_match_reference(split):
    model = model_with()
    blocks, cfg = mixed_blocks(model), config(split=split, basis="kfac")
    pen = make_penalty(model, blocks, cfg)
    groups = kfac_groups(pen)
    sizes = sorted(len(idx) for idx, _ in groups)
    shapes = {(tuple(g.members[0].target.shape), g.Ut is None) for _, g in groups}
    assert len(groups) == len(shapes)  # one group per (shape, variant)
    assert sum(sizes) == len(pen.modules) and max(sizes) >= 4  # q and o share (hidden, hidden) in every layer
    for _, g in groups:  # stacked V (n, in, k_in) and three (n, a, k_in) weights, float64 here
        n, a, k = g.m.shape
        expected = n * g.V.shape[1] * k + 3 * n * a * k + n + (0 if g.Ut is None else g.Ut.numel())
        assert g.nbytes() == 8 * expected
    compare(model, blocks, cfg, step=2)


def test_ranks_and_scales_form_separate_groups_and_match_reference():
    model = model_with(rank_pattern={"q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 3, "up_proj": 13},
                       use_rslora=True)
    blocks, cfg = mixed_blocks(model), config(basis="kfac")
    pen = make_penalty(model, blocks, cfg)
    ranks = {g.members[0].target.A.shape[0] for _, g in kfac_groups(pen)}
    assert ranks == {2, 4, 6}
    scales = {s for _, _, s in lora_factors(model).values()}
    assert len(scales) >= 3
    for _, g in kfac_groups(pen):  # every member keeps its own scale inside a group
        assert g.scale.view(-1).tolist() == [float(m.target.scale) for m in g.members]
    compare(model, blocks, cfg)


def test_coordinate_and_kfac_groups_together_every_gradient():
    from reference import coordinate_blocks
    from test_penalty import all_shapes

    model = model_with()
    blocks = coordinate_blocks(all_shapes(model), rho=0.05, budget="global", seed=1)
    blocks.update({n: b for n, b in mixed_blocks(model).items() if "k_proj" in n or "up_proj" in n})
    cfg = config()
    pen = make_penalty(model, blocks, cfg)
    assert kfac_groups(pen) and len(kfac_groups(pen)) < len(pen._groups())
    compare(model, blocks, cfg, step=3)  # values, per-module values and every A, B gradient


def test_group_follows_a_dtype_change():
    model = model_with()
    blocks, cfg = mixed_blocks(model), config(basis="kfac")
    pen = make_penalty(model, blocks, cfg)
    v64 = float(pen().total.detach())
    assert {g.V.dtype for _, g in kfac_groups(pen)} == {torch.float64}
    model.float()
    res = pen()
    assert {g.V.dtype for _, g in kfac_groups(pen)} == {torch.float32}
    assert float(res.total.detach()) == pytest.approx(v64, rel=1e-5)
