"""FisherMask, basis=coordinate: top-ρ support against a brute-force sort, norm/κ, weights, errors, summary."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from agl_core.blocks import CoordinateBlock, KFACStats
from agl_core.config import AGLConfig
from agl_core.mask import FisherMask
from agl_core.selection import protected_count

NAMES = ["model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"]


def random_fisher(shapes, seed=0, ties=False, zero_frac=0.0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in zip(NAMES, shapes):
        f = torch.randint(1, 6, shape, generator=gen).double() if ties else torch.rand(shape, generator=gen, dtype=torch.float64) ** 3
        f[torch.rand(shape, generator=gen) < zero_frac] = 0
        out[name] = f.to(dtype)
    return out


def brute_support(fisher, rho, budget):
    """Reference: flatten (modules in name order), stable descending sort, first k positive entries."""
    groups = [sorted(fisher)] if budget == "global" else [[n] for n in sorted(fisher)]
    chosen = {n: set() for n in fisher}
    for names in groups:
        flat = torch.cat([fisher[n].double().reshape(-1) for n in names])  # (N,)
        owner = [(n, j) for n in names for j in range(fisher[n].numel())]
        k = min(math.ceil(round(rho * flat.numel(), 6)), int((flat > 0).sum()))
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        for pos in order.tolist():
            name, j = owner[pos]
            chosen[name].add(j)
    return chosen


def mask_support(mask):
    return {n: set(b.index.tolist()) for n, b in mask.blocks.items()}


def check_against_brute(fisher, rho, budget):
    mask = FisherMask.from_fisher(fisher, AGLConfig(rho=rho, budget=budget))
    expected = brute_support(fisher, rho, budget)
    got = mask_support(mask)
    assert {n: s for n, s in expected.items() if s} == got
    assert set(mask.metadata["empty_modules"]) == {n for n, s in expected.items() if not s}
    return mask


@pytest.mark.parametrize("budget", ["global", "per_module"])
@pytest.mark.parametrize("ties", [False, True])
def test_selection_matches_brute_force(budget, ties):
    fisher = random_fisher([(7, 11), (5, 3), (9, 4)], seed=3, ties=ties)
    for rho in (0.01, 0.07, 0.3, 1.0):
        check_against_brute(fisher, rho, budget)


@pytest.mark.parametrize("budget", ["global", "per_module"])
def test_sampled_threshold_path_matches_brute_force(budget):
    # > 65536 entries per module: the threshold is guessed from a sample, then fixed up exactly.
    fisher = random_fisher([(300, 250), (200, 400), (64, 64)], seed=5)
    check_against_brute(fisher, 0.01, budget)
    tied = random_fisher([(300, 250), (200, 400), (64, 64)], seed=6, ties=True)
    check_against_brute(tied, 0.05, budget)


def test_adversarial_layout_for_the_sample_stays_exact():
    # Large values exactly on the sampled (even) positions: the sampled guess is too high, the
    # selection must widen its candidates (and finally take every positive entry) and stay exact.
    gen = torch.Generator().manual_seed(13)
    f = torch.rand(300 * 300, generator=gen, dtype=torch.float64) * 1e-3
    f[::2] += 1 + torch.rand(f[::2].shape, generator=gen, dtype=torch.float64)
    fisher = {NAMES[0]: f.reshape(300, 300)}
    for rho in (0.01, 0.7):
        check_against_brute(fisher, rho, "global")


def test_quantile_norm_kappa_global():
    fisher = random_fisher([(40, 30), (20, 50), (10, 10)], seed=1)
    rho = 0.05
    mask = FisherMask.from_fisher(fisher, AGLConfig(rho=rho))
    total = sum(f.numel() for f in fisher.values())
    inside = torch.cat([fisher[n].reshape(-1)[b.index.long()] for n, b in mask.blocks.items()])
    outside = torch.cat([
        fisher[n].reshape(-1)[~torch.isin(torch.arange(fisher[n].numel()), mask.blocks[n].index.long())]
        if n in mask.blocks else fisher[n].reshape(-1) for n in fisher
    ])
    assert inside.numel() == math.ceil(rho * total) == protected_count(rho, total)
    assert inside.min() >= outside.max()
    for name, block in mask.blocks.items():
        assert block.index.dtype == torch.int32 and block.fisher.dtype == torch.float32
        assert torch.all(block.index[1:] > block.index[:-1])
        assert torch.equal(block.fisher, fisher[name].reshape(-1)[block.index.long()])
        assert block.norm == pytest.approx(float(inside.double().mean()), rel=1e-12)
        assert block.kappa == float(inside.min())


def test_norm_kappa_per_module_and_weights():
    fisher = random_fisher([(40, 30), (20, 50), (10, 10)], seed=2)
    mask = FisherMask.from_fisher(fisher, AGLConfig(rho=0.1, budget="per_module"))
    for name, block in mask.blocks.items():
        assert block.size == math.ceil(0.1 * fisher[name].numel())
        assert block.norm == pytest.approx(float(block.fisher.double().mean()), rel=1e-12)
        assert block.kappa == float(block.fisher.min())
        soft = block.weights("soft")
        assert float(soft.min()) == pytest.approx(0.5) and bool((soft >= 0.5).all()) and bool((soft < 1).all())
        assert torch.equal(block.weights("hard"), torch.ones(block.size))
        assert float(block.fhat().double().mean()) == pytest.approx(1.0, rel=1e-6)
    kappas = {b.kappa for b in mask.blocks.values()}
    assert len(kappas) == 3  # one κ per module, not a global one


def test_zeros_never_protected_and_warned():
    fisher = random_fisher([(300, 300), (10, 10), (10, 10)], seed=4, zero_frac=0.999)
    positives = sum(int((f > 0).sum()) for f in fisher.values())
    with pytest.warns(UserWarning, match="positive"):
        mask = FisherMask.from_fisher(fisher, AGLConfig(rho=0.5))
    assert sum(b.size for b in mask.blocks.values()) == positives
    for name, block in mask.blocks.items():
        assert bool((block.fisher > 0).all())
        assert bool((fisher[name].reshape(-1)[block.index.long()] > 0).all())


def test_module_without_coordinates_is_recorded_as_empty():
    fisher = random_fisher([(20, 20), (5, 5), (5, 5)], seed=7)
    fisher[NAMES[1]] = torch.zeros(5, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = FisherMask.from_fisher(fisher, AGLConfig(rho=0.1))
    assert NAMES[1] not in mask.blocks
    assert mask.metadata["empty_modules"] == {NAMES[1]: [5, 5]}
    assert mask.covered_modules()[NAMES[1]] == [5, 5]
    rows = {r["name"]: r for r in mask.summary()}
    assert rows[NAMES[1]]["kind"] == "empty" and rows[NAMES[1]]["protected"] == 0


def test_all_zero_fisher_refused():
    fisher = {n: torch.zeros(4, 4) for n in NAMES}
    with pytest.raises(ValueError, match="no gradient"):
        FisherMask.from_fisher(fisher, AGLConfig())


@pytest.mark.parametrize(
    "fisher, match",
    [
        ({}, "non-empty dict"),
        ({"a": torch.ones(3)}, "2-D float tensor"),
        ({"a": torch.ones(3, 3, dtype=torch.int64)}, "2-D float tensor"),
        ({"a": -torch.ones(3, 3)}, "negative, NaN or infinite"),
        ({"a": torch.full((3, 3), float("nan"))}, "negative, NaN or infinite"),
        ({"a": torch.full((3, 3), float("inf"))}, "negative, NaN or infinite"),
        ({"a": torch.ones(0, 3)}, "is empty"),
        ({"a": KFACStats(torch.eye(3), torch.eye(2), 1)}, "basis=kfac"),
    ],
)
def test_bad_fisher_refused(fisher, match):
    with pytest.raises(ValueError, match=match):
        FisherMask.from_fisher(fisher, AGLConfig())


def test_reference_only_for_kfac():
    with pytest.raises(ValueError, match="basis=kfac only"):
        FisherMask.from_fisher(random_fisher([(3, 3)] * 3), AGLConfig(), reference={})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes_rank_like_their_values(dtype):
    fisher = random_fisher([(30, 20), (10, 10), (8, 8)], seed=9, dtype=dtype)
    mask = check_against_brute(fisher, 0.1, "global")
    for block in mask.blocks.values():
        assert block.fisher.dtype == torch.float32


def test_summary_by_layer_and_type():
    fisher = random_fisher([(20, 10), (10, 10), (10, 30)], seed=11)
    mask = FisherMask.from_fisher(fisher, AGLConfig(rho=0.2))
    rows = {r["name"]: r for r in mask.summary()}
    assert rows[NAMES[0]]["layer"] == 1 and rows[NAMES[0]]["module_type"] == "q_proj"
    assert rows[NAMES[1]]["layer"] == 0 and rows[NAMES[1]]["module_type"] == "down_proj"
    assert sum(r["share"] for r in rows.values()) == pytest.approx(1.0)
    for name, row in rows.items():
        assert row["kind"] == "coordinate"
        assert row["fraction"] == mask.blocks[name].size / fisher[name].numel()
    odd = FisherMask({"lm_head": CoordinateBlock((2, 2), torch.tensor([0], dtype=torch.int32), torch.ones(1), 1.0, 1.0)},
                     AGLConfig())
    assert odd.summary()[0]["layer"] is None and odd.summary()[0]["module_type"] == "lm_head"


def test_state_dict_round_trip_and_identity():
    fisher = random_fisher([(20, 10), (10, 10), (10, 30)], seed=12)
    mask = FisherMask.from_fisher(fisher, AGLConfig(rho=0.2), metadata={"estimator": "token", "data": ["p1", "p2"]})
    state = mask.state_dict()
    assert set(state["tensors"]) == {f"{n}::{f}" for n in mask.blocks for f in ("index", "fisher")}
    again = FisherMask.from_state_dict(state)
    assert again == mask and again.identity() == mask.identity()
    assert again.metadata == mask.metadata and again.config == mask.config
    for name, block in mask.blocks.items():
        assert torch.equal(again.blocks[name].index, block.index) and again.blocks[name].norm == block.norm
    other = FisherMask.from_fisher(fisher, AGLConfig(rho=0.1))
    assert other != mask and other.identity() != mask.identity()
    with pytest.raises(ValueError, match="'tensors' and 'meta'"):
        FisherMask.from_state_dict({"tensors": {}})


@settings(max_examples=12, deadline=None)
@given(
    shapes=st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=3),
    rho=st.floats(0.01, 1.0),
    budget=st.sampled_from(["global", "per_module"]),
    ties=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_property_matches_brute_force(shapes, rho, budget, ties, seed):
    fisher = random_fisher(shapes, seed=seed, ties=ties, zero_frac=0.2)
    if not any(bool((f > 0).any()) for f in fisher.values()):
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = check_against_brute(fisher, rho, budget)
    for block in mask.blocks.values():
        soft = block.weights("soft")  # float32: may round to exactly 1 for F ≫ κ
        assert bool((soft >= 0.5).all()) and bool((soft <= 1).all())
        exact = block.fisher.double() / (block.fisher.double() + block.kappa)
        assert bool((exact < 1).all())
