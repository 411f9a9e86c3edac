"""AGLPenalty against the dense float64 reference: values, gradients, precision, properties and errors.

Tolerances (stated here and in the report): float64 params match the reference to 1e-10 relative (values
and gradients). float32 params: values and gradients within 1e-5 relative. bf16 params (computed in
float32 from the exact bf16 values): values within 1e-5 relative; gradients come back in bf16, so within
1e-2 relative (bf16 has an 8-bit mantissa). Gradients are compared per tensor, max-norm relative, with a
1e-20 absolute floor for quantities that are exactly 0 in exact arithmetic (E_rie, E_geo under split=hard).
"""

from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig

import tiny
from agl_core.blocks import CoordinateBlock, KFACStats
from agl_core.config import AGLConfig
from agl_core.mask import FisherMask
from agl_core.modules import find_linear_modules
from agl_core.penalty import AGLPenalty
from reference import coordinate_blocks, kfac_blocks, lora_factors, reference

TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
TERMS = ("L_A", "L_T", "E_rie", "E_geo", "total")
Q0 = "model.layers.0.self_attn.q_proj"
ATOL = 1e-20  # absolute floor: the dense reference leaves ~1e-33 where exact arithmetic gives 0 (hard split)


def lora_model(dtype=torch.float64, seed=0, **kw):
    return tiny.tiny_lora(tiny.tiny_llama(seed), targets=TARGETS, seed=seed, **kw).to(dtype)


def all_shapes(model) -> dict:
    return {n: tuple(m.weight.shape) for n, m in find_linear_modules(model).items()}


def lora_shapes(model) -> dict:
    return {n: (B.shape[0], A.shape[1]) for n, (A, B, _) in lora_factors(model).items()}


def blocks_for(model, basis, budget="global", seed=0):
    if basis == "coordinate":
        return coordinate_blocks(all_shapes(model), rho=0.05, budget=budget, seed=seed)
    return kfac_blocks(lora_shapes(model), k_in=6, k_out="all" if basis == "kfac_all" else 8, seed=seed)


def config(**kw) -> AGLConfig:
    base = dict(lambda_a=1.3, lambda_t=0.2, lambda_nc=0.7, alpha=0.3, warmup_steps=4)
    return AGLConfig(**{**base, **kw})


def make_penalty(model, blocks, cfg, **kw) -> AGLPenalty:
    return AGLPenalty(model, FisherMask(blocks=blocks, config=cfg), cfg, **kw)


def assert_rel(actual, expected, rel, what="", atol=ATOL):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err, size = float((a - e).abs().max()), float(e.abs().max())
    assert err <= rel * size + atol, f"{what}: |err| {err:.3g} > {rel:g} × {size:.3g} + {atol:g}"


def grads(out, params):
    got = torch.autograd.grad(out, params, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for g, p in zip(got, params)]


def compare(model, blocks, cfg, step=1, rel_val=1e-10, rel_grad=1e-10):
    """Penalty vs reference: every term, total, diagnostics, per-module values, gradients wrt every A, B."""
    low = next(model.parameters()).dtype != torch.float64
    res = make_penalty(model, blocks, cfg)(step, per_module=True)
    ours, theirs = lora_factors(model), lora_factors(model, leaves=low)
    ref = reference(theirs, blocks, cfg, scale=cfg.lambda_scale(step))
    assert res.lambda_scale == cfg.lambda_scale(step)
    for k in TERMS + ("protected_share", "max_abs_dw_s"):
        assert_rel(getattr(res, k), ref[k], rel_val, k)
    for name, row in res.per_module.items():
        for k in ("L_A", "L_T", "E_rie", "E_geo"):
            assert_rel(torch.tensor(row[k], dtype=torch.float64), ref["per_module"][name][k], rel_val, f"{name} {k}")
    params = [t for f in ours.values() for t in f[:2]]
    ref_params = [t for f in theirs.values() for t in f[:2]]
    for k in TERMS:
        for g, gr in zip(grads(getattr(res, k), params), grads(ref[k], ref_params)):
            assert_rel(g, gr, rel_grad, f"grad {k}")
    return res, ref


@pytest.mark.parametrize("budget", ["global", "per_module"])
@pytest.mark.parametrize("split", ["soft", "hard"])
def test_coordinate_matches_dense_reference(split, budget):
    model = lora_model()
    res, ref = compare(model, blocks_for(model, "coordinate", budget), config(split=split, budget=budget))
    m = res.metrics()
    assert m["agl/L_A"] > 0 and m["agl/penalty"] > 0 and 0 < m["agl/protected_share"] < 1
    assert (m["agl/E_rie"] > 0) == (split == "soft")


@pytest.mark.parametrize("basis", ["kfac", "kfac_all"])
@pytest.mark.parametrize("split", ["soft", "hard"])
def test_kfac_matches_dense_reference(split, basis):
    model = lora_model()
    res, _ = compare(model, blocks_for(model, basis), config(split=split, basis="kfac"), step=7)
    m = res.metrics()
    assert m["agl/lambda_scale"] == 1.0 and m["agl/L_A"] > 0 and (m["agl/E_geo"] > 0) == (split == "soft")


def empty(shape) -> CoordinateBlock:
    return CoordinateBlock(tuple(shape), torch.zeros(0, dtype=torch.int32), torch.zeros(0), 1.0, 0.5)


def test_empty_block_and_mixed_bases_match_reference():
    model = lora_model()
    blocks = blocks_for(model, "coordinate")
    blocks.update({n: b for n, b in blocks_for(model, "kfac").items() if "up_proj" in n})
    blocks[Q0] = empty(blocks[Q0].shape)
    res, ref = compare(model, blocks, config())
    assert res.per_module[Q0]["E_rie"] == 0.0 and res.per_module[Q0]["L_A"] == 0.0
    assert res.per_module[Q0]["L_T"] == pytest.approx(res.per_module[Q0]["dw_sq"], rel=1e-12)


def test_module_listed_as_empty_in_mask_metadata_gets_only_l_t():
    model = lora_model()
    blocks, cfg = blocks_for(model, "coordinate"), config()
    shape = blocks.pop(Q0).shape
    mask = FisherMask(blocks=blocks, config=cfg, metadata={"empty_modules": {Q0: list(shape)}})
    res = AGLPenalty(model, mask, cfg)(per_module=True)
    ref = reference(lora_factors(model), {**blocks, Q0: empty(shape)}, cfg)
    assert res.per_module[Q0]["size"] == 0 and res.per_module[Q0]["L_A"] == 0.0
    for k in TERMS:
        assert_rel(getattr(res, k), ref[k], 1e-10, k)


@pytest.mark.parametrize("budget", ["global", "per_module"])
def test_mask_from_fisher_matches_reference(budget):
    model = lora_model()
    gen = torch.Generator().manual_seed(3)
    fisher = {n: torch.rand(s, generator=gen) ** 6 for n, s in all_shapes(model).items()}
    cfg = config(rho=0.02, budget=budget)
    mask = FisherMask.from_fisher(fisher, cfg)
    shapes = mask.covered_modules()
    blocks = {n: mask.blocks.get(n) or empty(shapes[n]) for n in shapes}
    res = AGLPenalty(model, mask, cfg)(2)
    ref = reference(lora_factors(model), blocks, cfg, scale=cfg.lambda_scale(2))
    for k in TERMS:
        assert_rel(getattr(res, k), ref[k], 1e-10, k)


@pytest.mark.parametrize("k_out", [3, "all"])
def test_kfac_mask_from_stats_matches_reference(k_out):
    """Stored K-FAC bases are float32 (orthonormal to ~1e-7), so L_T's identity holds to ~1e-7 only."""
    model = lora_model()
    gen = torch.Generator().manual_seed(4)
    stats = {}
    for name, (out_f, in_f) in all_shapes(model).items():
        x, g = torch.randn(40, in_f, generator=gen), torch.randn(40, out_f, generator=gen)
        stats[name] = KFACStats(x.t() @ x, g.t() @ g, 40)
    cfg = config(basis="kfac", k_in=4, k_out=k_out)
    mask = FisherMask.from_fisher(stats, cfg)
    res = AGLPenalty(model, mask, cfg)()
    ref = reference(lora_factors(model), mask.blocks, cfg)
    for k in TERMS:
        assert_rel(getattr(res, k), ref[k], 1e-6, k)


@pytest.mark.parametrize("basis", ["coordinate", "kfac"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_params_match_float64_reference(dtype, basis):
    model = lora_model(dtype)
    res, _ = compare(model, blocks_for(model, basis), config(basis=basis.split("_")[0]),
                     rel_val=1e-5, rel_grad=1e-5 if dtype == torch.float32 else 1e-2)
    assert res.total.dtype == torch.float32


def test_chunking_gives_the_same_values_and_grads():
    model = lora_model()
    blocks, cfg = blocks_for(model, "coordinate"), config()
    params = [p for p in model.parameters() if p.requires_grad]
    one, many = make_penalty(model, blocks, cfg)(), make_penalty(model, blocks, cfg, chunk_size=5)()
    for k in TERMS:
        assert_rel(many.__dict__[k], one.__dict__[k], 1e-13, k)
        for g1, g2 in zip(grads(one.__dict__[k], params), grads(many.__dict__[k], params)):
            assert_rel(g2, g1, 1e-12, f"grad {k}")


def test_disabled_total_is_zero_and_terms_still_reported():
    model = lora_model()
    res = make_penalty(model, blocks_for(model, "coordinate"), config(enabled=False))(3)
    assert float(res.total) == 0.0 and not res.total.requires_grad
    assert float(res.L_A) > 0 and not res.L_A.requires_grad


def test_warmup_scales_the_total_and_metrics_are_floats():
    model = lora_model()
    pen = make_penalty(model, blocks_for(model, "coordinate"), config(warmup_steps=4))
    full, half = pen(), pen(1)
    assert half.lambda_scale == 0.5
    assert float(half.total.detach()) == pytest.approx(0.5 * float(full.total.detach()), rel=1e-14)
    metrics = half.metrics()
    assert set(metrics) == {"agl/penalty", "agl/L_A", "agl/L_T", "agl/E_rie", "agl/E_geo",
                            "agl/protected_share", "agl/lambda_scale"}
    assert all(type(v) is float for v in metrics.values()) and metrics["agl/lambda_scale"] == 0.5
    assert metrics["agl/penalty"] == pytest.approx(float(half.total.detach()))


def test_model_dtype_change_recaches_block_tensors():
    model = lora_model()
    blocks, cfg = blocks_for(model, "kfac"), config(basis="kfac")
    pen = make_penalty(model, blocks, cfg)
    v64 = float(pen().total.detach())
    model.float()
    res = pen()
    assert res.total.dtype == torch.float32 and float(res.total.detach()) == pytest.approx(v64, rel=1e-5)


def test_frozen_ref_adapter_is_skipped():
    model = lora_model()
    model.add_adapter("ref", LoraConfig(r=2, target_modules=list(TARGETS)))
    model.base_model.set_adapter(["default", "ref"])
    for name, p in model.named_parameters():
        p.requires_grad_(".default." in name)
    model.double()
    pen = make_penalty(model, blocks_for(model, "coordinate"), config())
    assert len(pen.modules) == 8 and all("[" not in k for k in pen.modules)
    compare(model, blocks_for(model, "coordinate"), config())


# ---------------------------------------------------------------- properties

_MODEL = {}


def shared_model():
    if not _MODEL:
        model = lora_model()
        _MODEL.update(model=model, blocks={b: blocks_for(model, b) for b in ("coordinate", "kfac", "kfac_all")})
    return _MODEL["model"], _MODEL["blocks"]


def set_lora(model, seed, a_scale, b_scale):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * (a_scale if "lora_A" in name else b_scale))


BASIS = st.sampled_from(["coordinate", "kfac", "kfac_all"])
SPLIT = st.sampled_from(["soft", "hard"])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), a_scale=st.floats(1e-3, 3), b_scale=st.floats(1e-4, 10), basis=BASIS, split=SPLIT)
def test_terms_are_nonnegative_and_hard_split_kills_collisions(seed, a_scale, b_scale, basis, split):
    model, blocks = shared_model()
    set_lora(model, seed, a_scale, b_scale)
    res = make_penalty(model, blocks[basis], config(split=split, basis=basis.split("_")[0]))(per_module=True)
    v = {k: float(getattr(res, k).detach()) for k in TERMS + ("protected_share",)}
    assert all(v[k] >= 0 for k in TERMS) and v["protected_share"] <= 1 + 1e-12, v
    assert all(row["E_geo"] <= 1 + 1e-9 for row in res.per_module.values())  # a squared cosine
    if split == "hard":
        assert v["E_rie"] == 0.0 and v["E_geo"] == 0.0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), basis=BASIS, split=SPLIT)
def test_zero_update_gives_zero_terms_and_finite_grads(seed, basis, split):
    model, blocks = shared_model()
    set_lora(model, seed, 1.0, 0.0)  # the PEFT init: B = 0
    res = make_penalty(model, blocks[basis], config(split=split, basis=basis.split("_")[0]))()
    for k in TERMS + ("protected_share", "max_abs_dw_s"):
        assert float(getattr(res, k).detach()) == 0.0, k
    params = [p for p in model.parameters() if p.requires_grad]
    for k in TERMS:
        assert all(bool(torch.isfinite(g).all()) for g in grads(getattr(res, k), params))


# ---------------------------------------------------------------- errors and warnings


def test_module_missing_from_mask_is_named():
    model = lora_model()
    blocks = blocks_for(model, "coordinate")
    del blocks[Q0]
    with pytest.raises(ValueError, match=r"1 LoRA module\(s\) have no entry in the mask: .*q_proj.*target_modules"):
        make_penalty(model, blocks, config())
    few = {n: b for n, b in blocks.items() if "layers.1.mlp" in n}  # covers 2 of the 8 LoRA modules
    with pytest.raises(ValueError, match=r"6 LoRA module.* and 1 more"):
        make_penalty(model, few, config())


def test_target_modules_can_exclude_unmasked_modules():
    model = lora_model()
    blocks = {n: b for n, b in blocks_for(model, "coordinate").items() if "self_attn" in n}
    pen = make_penalty(model, blocks, config(target_modules=["q_proj", "v_proj"]))
    assert len(pen.modules) == 4 and pen().metrics()["agl/penalty"] > 0


def test_dora_message_reaches_the_user():
    model = lora_model(use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        make_penalty(model, blocks_for(model, "coordinate"), config())


def test_no_lora_adapter_is_a_clear_error():
    model = tiny.tiny_llama(0)
    with pytest.raises(ValueError, match="No active, trainable LoRA adapter"):
        make_penalty(model, coordinate_blocks(all_shapes(model), 0.05, "global"), config())


def test_shape_mismatch_is_a_clear_error():
    model = lora_model()
    blocks = blocks_for(model, "coordinate")
    blocks[Q0] = coordinate_blocks({Q0: (64, 32)}, 0.05, "global")[Q0]
    with pytest.raises(ValueError, match=r"shape \(64, 32\) but the LoRA update there is \(64, 64\)"):
        make_penalty(model, blocks, config())


def test_malformed_blocks_are_clear_errors():
    model = lora_model()
    good = blocks_for(model, "coordinate")
    bad_index = dict(good)
    b = good[Q0]
    bad_index[Q0] = CoordinateBlock(b.shape, b.index + 64 * 64, b.fisher, b.norm, b.kappa)
    with pytest.raises(ValueError, match="outside"):
        make_penalty(model, bad_index, config())
    kf = blocks_for(model, "kfac")
    kf[Q0].V = kf[Q0].V * 2
    with pytest.raises(ValueError, match="orthonormal"):
        make_penalty(model, kf, config(basis="kfac"))


def test_bad_arguments_are_clear_errors():
    model = lora_model()
    blocks, cfg = blocks_for(model, "coordinate"), config()
    with pytest.raises(ValueError, match="FisherMask"):
        AGLPenalty(model, blocks, cfg)
    with pytest.raises(ValueError, match="torch.nn.Module"):
        AGLPenalty("model", FisherMask(blocks=blocks, config=cfg), cfg)
    with pytest.raises(ValueError, match="AGLConfig"):
        AGLPenalty(model, FisherMask(blocks=blocks, config=cfg), {"lambda_a": 1})
    with pytest.raises(ValueError, match="chunk_size"):
        make_penalty(model, blocks, cfg, chunk_size=0)
    with pytest.raises(ValueError, match="step"):
        make_penalty(model, blocks, cfg)(step=1.5)


def test_non_finite_update_names_the_module():
    model = lora_model()
    pen = make_penalty(model, blocks_for(model, "coordinate"), config())
    with torch.no_grad():
        model.base_model.model.model.layers[1].mlp.up_proj.lora_B["default"].weight[3, 1] = float("inf")
    with pytest.raises(FloatingPointError, match="model.layers.1.mlp.up_proj"):
        pen()


def test_unmatched_and_mismatched_settings_are_logged(caplog):
    model = lora_model()
    blocks = blocks_for(model, "coordinate")
    mask = FisherMask(blocks=blocks, config=config(rho=0.05))
    with caplog.at_level(logging.WARNING, logger="agl_core.penalty"):
        pen = AGLPenalty(model, mask, config(rho=0.01))
    assert sorted(pen.unmatched_mask_modules) == sorted(n for n in blocks if not n.endswith(TARGETS))
    assert len(pen.unmatched_mask_modules) == 6
    text = caplog.text
    assert "6 module(s) with no trainable LoRA adapter" in text and "rho: config 0.01 vs mask 0.05" in text
