"""The chunked LoRA gather: gradcheck, dense agreement, bad inputs, and a shape whose ΔW could never exist."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from agl_core.blocks import CoordinateBlock, KFACBlock
from agl_core.config import AGLConfig
from agl_core.gather import delta_sq_norm, gather_delta, kfac_project
from agl_core.mask import FisherMask
from agl_core.penalty import AGLPenalty


def factors(out_f=9, in_f=7, r=3, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(r, in_f, generator=gen, dtype=dtype).requires_grad_(True)
    B = torch.randn(out_f, r, generator=gen, dtype=dtype).requires_grad_(True)
    return A, B


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gather_equals_dense_delta_for_any_chunk(index_dtype):
    A, B = factors()
    index = torch.randperm(63, generator=torch.Generator().manual_seed(1))[:40].sort().values.to(index_dtype)
    dense = (1.7 * B @ A).flatten()[index.long()]  # (|S|,)
    for chunk in (1, 3, 40, 10_000):
        d = gather_delta(A, B, index, 7, 1.7, chunk)
        assert d.dtype == torch.float64 and torch.allclose(d, dense, rtol=1e-14, atol=0)


def test_gather_passes_gradcheck_in_float64():
    A, B = factors()
    index = torch.tensor([0, 5, 6, 12, 13, 20, 33, 34, 48, 62])  # repeated rows and columns
    assert torch.autograd.gradcheck(lambda a, b: gather_delta(a, b, index, 7, 0.9, 3), (A, B))
    frozen_a = A.detach()
    assert torch.autograd.gradcheck(lambda b: gather_delta(frozen_a, b, index, 7, 0.9, 4), (B,))


def test_gram_norm_and_kfac_projection_match_dense():
    A, B = factors()
    dw = 1.3 * B @ A
    assert torch.allclose(delta_sq_norm(A, B, 1.3), (dw * dw).sum(), rtol=1e-14)
    U = torch.linalg.qr(torch.randn(9, 4, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(7, 2, dtype=torch.float64)).Q
    assert torch.allclose(kfac_project(A, B, 1.3, U, V), U.t() @ dw @ V, rtol=1e-13)
    assert torch.allclose(kfac_project(A, B, 1.3, None, V), dw @ V, rtol=1e-13)


def test_gather_rejects_bad_inputs():
    A, B = factors()
    index = torch.arange(5)
    with pytest.raises(ValueError, match="same r"):
        gather_delta(A, B[:, :2], index, 7, 1.0)
    with pytest.raises(ValueError, match="dtype/device"):
        gather_delta(A, B.float(), index, 7, 1.0)
    with pytest.raises(ValueError, match="int32/int64"):
        gather_delta(A, B, index.float(), 7, 1.0)
    with pytest.raises(ValueError, match="n_cols"):
        gather_delta(A, B, index, 9, 1.0)
    with pytest.raises(ValueError, match="chunk"):
        gather_delta(A, B, index, 7, 1.0, chunk=0)


class BareLoRA(nn.Module):
    """A LoRA-shaped module (lora_A, lora_B, scaling, base_layer) with no weight of its own in memory."""

    def __init__(self, out_f: int, in_f: int, r: int) -> None:
        super().__init__()
        self.base_layer = nn.Linear(in_f, out_f, bias=False, device="meta")  # (out, in) never allocated
        self.lora_A = nn.ModuleDict({"default": nn.Linear(in_f, r, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(r, out_f, bias=False)})
        nn.init.normal_(self.lora_B["default"].weight, std=0.01)
        self.scaling = {"default": 2.0}
        self.active_adapters = ["default"]


@pytest.mark.parametrize("basis", ["coordinate", "kfac"])
def test_huge_module_never_materialises_delta_w(basis):
    """2^18 × 2^18: a dense ΔW (256 GiB in float32) cannot exist, so any out×in tensor would fail here."""
    n, r, size = 2**18, 4, 100_000
    model = nn.Module()
    model.proj = BareLoRA(n, n, r)
    gen = torch.Generator().manual_seed(0)
    if basis == "coordinate":
        index = torch.randint(0, n * n, (size,), generator=gen).unique()  # sorted int64 flat indices
        block = CoordinateBlock((n, n), index, torch.rand(index.numel(), generator=gen) + 0.1, 0.6, 0.1)
    else:
        V = torch.linalg.qr(torch.randn(n, 8, generator=gen)).Q  # (in, k_in)
        block = KFACBlock((n, n), None, V, torch.ones(n), torch.rand(8, generator=gen) + 0.1, 0.6, 0.1)
    cfg = AGLConfig(basis=basis, k_out="all", lambda_t=0.1)
    start = time.perf_counter()
    pen = AGLPenalty(model, FisherMask(blocks={"proj": block}, config=cfg), cfg, chunk_size=16384)
    res = pen()
    res.total.backward()
    elapsed = time.perf_counter() - start
    A, B = model.proj.lora_A["default"].weight, model.proj.lora_B["default"].weight
    assert torch.isfinite(A.grad).all() and torch.isfinite(B.grad).all() and float(B.grad.abs().sum()) > 0
    if basis == "coordinate":  # L_A by hand from the gathered coordinates (|S| × r, small)
        rows, cols = block.rows_cols()
        with torch.no_grad():
            d = 2.0 * (B[rows] * A[:, cols].t()).sum(1)  # (|S|,)
            m = block.weights("soft")
            assert float(res.L_A.detach()) == pytest.approx(float((block.fhat() * (m * d) ** 2).sum()), rel=1e-5)
    assert elapsed < 10, f"penalty on a 2^18 × 2^18 module took {elapsed:.1f} s"
