"""FisherMask, basis=kfac: eigen-bases of X and G, k_out=all, contrastive bases, norm/κ, errors."""

from __future__ import annotations

import pytest
import torch

from agl_core.blocks import KFACBlock, KFACStats
from agl_core.config import AGLConfig
from agl_core.kfac import contrastive_eigenpairs, top_eigenpairs
from agl_core.mask import FisherMask

D = torch.float64


def orthogonal(n, seed):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=D))
    return q  # (n, n)


def covariance(n, seed, rank=None):
    x = torch.randn(3 * n if rank is None else rank, n, generator=torch.Generator().manual_seed(seed), dtype=D)
    return x.T @ x  # (n, n) sum of outer products


def stats(n_out, n_in, seed, count=7):
    return KFACStats(covariance(n_in, seed), covariance(n_out, seed + 100), count)


def assert_orthonormal(m, tol=1e-5):
    eye = torch.eye(m.shape[1], dtype=D)
    assert torch.allclose(m.double().T @ m.double(), eye, atol=tol)


def dense_block_fisher(block):
    return torch.outer(block.mu.double(), block.lam.double())  # (k_out or out, k_in) reference


def test_known_eigenvectors_recovered():
    q, p = orthogonal(10, 1), orthogonal(6, 2)
    x = q @ torch.diag(torch.linspace(10, 1, 10, dtype=D)) @ q.T  # eigvecs q[:, j] with eigenvalue 10-j
    g = p @ torch.diag(torch.tensor([9.0, 5, 4, 3, 2, 1], dtype=D)) @ p.T
    mask = FisherMask.from_fisher({"m": KFACStats(x * 4, g * 4, 4)}, AGLConfig(basis="kfac", k_in=3, k_out=2))
    block = mask.blocks["m"]
    assert isinstance(block, KFACBlock) and block.shape == (6, 10)
    assert torch.allclose((block.V.double().T @ q[:, :3]).abs(), torch.eye(3, dtype=D), atol=1e-5)
    assert torch.allclose((block.U.double().T @ p[:, :2]).abs(), torch.eye(2, dtype=D), atol=1e-5)
    assert torch.allclose(block.lam.double(), torch.linspace(10, 1, 10, dtype=D)[:3], atol=1e-5)
    assert torch.allclose(block.mu.double(), torch.tensor([9.0, 5], dtype=D), atol=1e-5)


def test_bases_orthonormal_descending_and_deterministic():
    data = {"a": stats(8, 12, 0), "b": stats(5, 12, 1)}
    cfg = AGLConfig(basis="kfac", k_in=4, k_out=3)
    mask = FisherMask.from_fisher(data, cfg)
    for block in mask.blocks.values():
        assert_orthonormal(block.V)
        assert_orthonormal(block.U)
        assert bool((block.lam[:-1] >= block.lam[1:]).all()) and bool((block.mu[:-1] >= block.mu[1:]).all())
        for vec in (block.V, block.U):  # sign convention: the largest-magnitude entry of each column is positive
            assert bool((vec[vec.abs().argmax(0), torch.arange(vec.shape[1])] > 0).all())
    again = FisherMask.from_fisher(data, cfg)
    assert again == mask


def test_k_clipped_to_dimension():
    mask = FisherMask.from_fisher({"m": stats(3, 5, 2)}, AGLConfig(basis="kfac", k_in=100, k_out="50"))
    block = mask.blocks["m"]
    assert block.V.shape == (5, 5) and block.U.shape == (3, 3) and block.size == 15


@pytest.mark.parametrize("weight", ["g_diag", "ones"])
def test_k_out_all(weight):
    st = stats(6, 9, 3, count=3)
    mask = FisherMask.from_fisher({"m": st}, AGLConfig(basis="kfac", k_in=2, k_out="all", kfac_out_weight=weight))
    block = mask.blocks["m"]
    assert block.U is None and block.V.shape == (9, 2) and block.mu.shape == (6,)
    expected = torch.diagonal(st.G / 3) if weight == "g_diag" else torch.ones(6, dtype=D)
    assert torch.allclose(block.mu.double(), expected, rtol=1e-6)
    assert block.fisher().shape == (6, 2)


@pytest.mark.parametrize("budget", ["global", "per_module"])
def test_norm_kappa_against_dense_block_fisher(budget):
    x0 = covariance(7, 4)
    x0[:, 0] = x0[0, :] = 0  # rank-deficient input side: some λ are 0
    data = {"a": KFACStats(x0, covariance(4, 5), 2), "b": stats(5, 7, 6), "c": stats(3, 7, 8)}
    mask = FisherMask.from_fisher(data, AGLConfig(basis="kfac", k_in=7, k_out=3, budget=budget))
    dense = {n: dense_block_fisher(b) for n, b in mask.blocks.items()}
    assert float(mask.blocks["a"].lam.min()) == 0.0
    if budget == "global":
        pos = torch.cat([f[f > 0] for f in dense.values()])
        for block in mask.blocks.values():
            assert block.norm == pytest.approx(float(pos.mean()), rel=1e-12)
            assert block.kappa == pytest.approx(float(pos.min()), rel=1e-12)
    else:
        for name, block in mask.blocks.items():
            pos = dense[name][dense[name] > 0]
            assert block.norm == pytest.approx(float(pos.mean()), rel=1e-12)
            assert block.kappa == pytest.approx(float(pos.min()), rel=1e-12)
    for name, block in mask.blocks.items():
        soft = block.weights("soft")[dense[name] > 0]
        assert bool((soft >= 0.5 - 1e-6).all()) and bool((soft < 1).all())


def test_round_off_eigenvalues_count_as_zero_and_zero_blocks_are_empty():
    low_rank = covariance(12, 9, rank=2)  # 10 eigenvalues are pure round-off
    lam, _ = top_eigenpairs(low_rank, 12)
    assert int((lam > 0).sum()) == 2
    data = {"a": KFACStats(low_rank, covariance(3, 1), 1), "z": KFACStats(torch.zeros(12, 12), covariance(3, 2), 1)}
    mask = FisherMask.from_fisher(data, AGLConfig(basis="kfac", k_in=12, k_out=3))
    assert set(mask.blocks) == {"a"} and mask.metadata["empty_modules"] == {"z": [3, 12]}
    assert mask.blocks["a"].kappa > 1e-6 * mask.blocks["a"].norm


def test_all_zero_stats_refused():
    data = {"a": KFACStats(torch.zeros(4, 4), torch.zeros(3, 3), 5)}
    with pytest.raises(ValueError, match="no gradient"):
        FisherMask.from_fisher(data, AGLConfig(basis="kfac"))


def _contrastive_setup(n=8, seed=10):
    q = orthogonal(n, seed)
    shared, special = q[:, 0], q[:, 1]  # shared: energy in both; special: alignment inputs only
    x_align = 10 * torch.outer(shared, shared) + 5 * torch.outer(special, special) + 0.1 * torch.eye(n, dtype=D)
    x_ref = 10 * torch.outer(shared, shared) + 0.1 * torch.eye(n, dtype=D)
    return x_align, x_ref, shared, special


def test_contrastive_prefers_alignment_only_direction():
    x_align, x_ref, shared, special = _contrastive_setup()
    data = {"m": KFACStats(x_align, covariance(3, 0), 1)}
    plain = FisherMask.from_fisher(data, AGLConfig(basis="kfac", k_in=1, k_out=3)).blocks["m"]
    assert abs(float(plain.V[:, 0].double() @ shared)) == pytest.approx(1, abs=1e-5)
    mask = FisherMask.from_fisher(data, AGLConfig(basis="kfac", k_in=2, k_out=3), reference={"m": x_ref})
    block = mask.blocks["m"]
    lam, vecs = contrastive_eigenpairs(x_align, x_ref, 1, 1e-3)
    assert abs(float(vecs[:, 0] @ special)) == pytest.approx(1, abs=1e-6)
    assert float(lam[0]) == pytest.approx(5.1, rel=1e-9)  # alignment energy along `special`
    assert_orthonormal(block.V)
    assert mask.metadata["contrastive"] is True


def test_contrastive_basis_spans_generalised_eigenvectors():
    n, k, delta = 9, 3, 1e-2
    x_align, x_ref = covariance(n, 20) / 27, covariance(n, 21) / 27
    lam, vecs = contrastive_eigenpairs(x_align, x_ref, k, delta)
    ridge = x_ref + delta * x_ref.diagonal().mean() * torch.eye(n, dtype=D)
    evals, evecs = torch.linalg.eig(torch.linalg.solve(ridge, x_align))  # dense reference (non-symmetric)
    top = evecs.real[:, evals.real.argsort(descending=True)[:k]]  # (n, k)
    qref, _ = torch.linalg.qr(top)
    assert torch.allclose(vecs @ vecs.T, qref @ qref.T, atol=1e-10)  # same span (projectors)
    assert torch.allclose(vecs.T @ vecs, torch.eye(k, dtype=D), atol=1e-12)
    inner = vecs.T @ x_align @ vecs  # diagonal, = diag(lam), descending
    assert torch.allclose(inner, torch.diag(lam), atol=1e-10)
    assert bool((lam[:-1] >= lam[1:]).all())


@pytest.mark.parametrize(
    "reference, match",
    [
        ({}, "lack module 'm'"),
        ({"m": torch.eye(5)}, r"must be \(4, 4\)"),
        ({"m": torch.zeros(4, 4)}, "is zero"),
        ({"m": torch.full((4, 4), float("nan"))}, "NaN/inf"),
    ],
)
def test_bad_reference_refused(reference, match):
    with pytest.raises(ValueError, match=match):
        FisherMask.from_fisher({"m": stats(3, 4, 0)}, AGLConfig(basis="kfac"), reference=reference)


def test_singular_reference_without_ridge_refused():
    singular = torch.diag(torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=D))
    with pytest.raises(ValueError, match="raise contrastive_delta"):
        FisherMask.from_fisher(
            {"m": stats(3, 4, 0)}, AGLConfig(basis="kfac", contrastive_delta=0.0), reference={"m": singular}
        )


@pytest.mark.parametrize(
    "data, match",
    [
        ({}, "non-empty dict"),
        ({"m": torch.ones(3, 4)}, "needs KFACStats"),
        ({"m": KFACStats(torch.ones(3, 4), torch.eye(2), 1)}, "square float matrix"),
        ({"m": KFACStats(torch.eye(3), torch.full((2, 2), float("inf")), 1)}, "NaN/inf"),
    ],
)
def test_bad_stats_refused(data, match):
    with pytest.raises(ValueError, match=match):
        FisherMask.from_fisher(data, AGLConfig(basis="kfac"))


def test_shared_inputs_share_the_basis():
    x = covariance(10, 30)
    data = {f"l.{p}": KFACStats(x.clone(), covariance(4, i), 2) for i, p in enumerate(("q", "k", "v"))}
    mask = FisherMask.from_fisher(data, AGLConfig(basis="kfac", k_in=3, k_out=2))
    assert torch.equal(mask.blocks["l.q"].V, mask.blocks["l.v"].V)
    assert not torch.equal(mask.blocks["l.q"].U, mask.blocks["l.v"].U)
