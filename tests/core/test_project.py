"""Post-hoc projection of a LoRA update off a mask's protected input directions, against a dense float64 reference."""

import pytest
import torch

from agl_core.blocks import KFACBlock
from agl_core.config import AGLConfig
from agl_core.mask import FisherMask
from agl_core.project import module_of, project_adapter, project_lora_a


def _orthonormal(n, k, gen):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q


def test_projected_update_has_no_protected_part_and_keeps_the_rest():
    gen = torch.Generator().manual_seed(0)
    out_dim, in_dim, r, k = 12, 10, 3, 4
    B = torch.randn(out_dim, r, generator=gen, dtype=torch.float64)
    A = torch.randn(r, in_dim, generator=gen, dtype=torch.float64)
    V = _orthonormal(in_dim, k, gen)
    dW, dW_proj = B @ A, B @ project_lora_a(A, V)
    P = V @ V.T
    torch.testing.assert_close(dW_proj, dW @ (torch.eye(in_dim, dtype=torch.float64) - P))  # dense reference
    assert torch.linalg.norm(dW_proj @ V) < 1e-12  # nothing left on the protected directions
    other = _orthonormal(in_dim, in_dim, gen)
    other = other - P @ other  # any direction orthogonal to V is left exactly as it was
    torch.testing.assert_close(dW_proj @ other, dW @ other)
    assert torch.linalg.norm(dW @ V) > 0.1  # (the projection had something to remove)


def _mask(names, in_dim, k, gen, **cfg):
    blocks = {n: KFACBlock(shape=(6, in_dim), U=None, V=_orthonormal(in_dim, k, gen).float(), mu=torch.ones(6),
                           lam=torch.ones(k), norm=1.0, kappa=0.5) for n in names}
    return FisherMask(blocks, AGLConfig(basis="kfac", k_in=k, k_out="all", **cfg))


def test_adapter_tensors_of_protected_modules_are_projected_others_untouched():
    gen = torch.Generator().manual_seed(1)
    mask = _mask(["model.layers.0.self_attn.q_proj"], 8, 2, gen)
    weights = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 8, generator=gen),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(6, 4, generator=gen),
        "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight": torch.randn(4, 8, generator=gen),
    }
    new, done = project_adapter(weights, mask)
    assert done == ["model.layers.0.self_attn.q_proj"]
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    V = mask.blocks["model.layers.0.self_attn.q_proj"].V
    assert new[key].dtype == torch.float32 and torch.linalg.norm(new[key] @ V) < 1e-5
    for other in ("lora_B", "v_proj.lora_A"):
        k2 = next(k for k in weights if other in k)
        assert torch.equal(new[k2], weights[k2])
    assert module_of(key) == "model.layers.0.self_attn.q_proj"


def test_bad_inputs_are_explained():
    gen = torch.Generator().manual_seed(2)
    with pytest.raises(ValueError, match="must be \\(r, in\\)"):
        project_lora_a(torch.zeros(3, 5), torch.zeros(4, 2))
    mask = _mask(["model.layers.0.mlp.up_proj"], 8, 2, gen)
    with pytest.raises(ValueError, match="No LoRA module of the adapter is protected"):
        project_adapter({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 8)}, mask)
    coord = FisherMask({}, AGLConfig(basis="coordinate"))
    with pytest.raises(ValueError, match="needs an input-side mask"):
        project_adapter({}, coord)


def test_remove_block_matches_the_kronecker_projector_in_float64():
    from agl_core.project import remove_block

    g = torch.Generator().manual_seed(3)
    d = torch.randn(7, 5, generator=g, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(7, 3, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(5, 2, generator=g, dtype=torch.float64))[0]
    eye_u, eye_v = torch.eye(7, dtype=torch.float64), torch.eye(5, dtype=torch.float64)
    for u, v, pu, pv in ((U, V, U @ U.T, V @ V.T), (U, None, U @ U.T, eye_v), (None, V, eye_u, V @ V.T)):
        proj = torch.kron(pu, pv)  # row-major vec(ΔW): vec(P_U ΔW P_V) = (P_U ⊗ P_Vᵀ) vec(ΔW), P_V symmetric
        want = (d.reshape(-1) - proj @ d.reshape(-1)).reshape(7, 5)
        got = remove_block(d.float(), u, v)
        assert got.dtype == torch.float64 and torch.allclose(got, want.float().double(), atol=1e-6)
        assert torch.allclose(remove_block(d, u, v), want, atol=1e-12)
    left = remove_block(d, U, V)
    assert torch.allclose(U.T @ left @ V, torch.zeros(3, 2, dtype=torch.float64), atol=1e-12)  # nothing left on it
    assert torch.equal(remove_block(d), torch.zeros_like(d))
    with pytest.raises(ValueError, match=r"output directions of shape \(5, 2\): they must be \(7, k\)"):
        remove_block(d, V)
