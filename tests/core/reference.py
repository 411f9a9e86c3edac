"""Dense float64 reference of the AGL terms (materialised ΔW and masks), plus random test masks."""

from __future__ import annotations

import math

import torch

from agl_core.blocks import CoordinateBlock, KFACBlock

PEFT_PREFIX = "base_model.model."
F64 = torch.float64


def lora_factors(model, adapter: str = "default", leaves: bool = False) -> dict[str, tuple]:
    """name -> (A (r, in), B (out, r), s) read straight from the PEFT modules (independent of agl_core).

    leaves=True: float64 copies that are fresh autograd leaves (for low-precision comparisons).
    """
    out = {}
    for name, module in model.named_modules():
        if not (hasattr(module, "lora_A") and hasattr(module, "scaling")) or adapter not in module.lora_A:
            continue
        A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
        if leaves:
            A, B = (t.detach().to(F64).requires_grad_(True) for t in (A, B))
        key = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        out[key] = (A, B, float(module.scaling[adapter]))
    return out


def _weights(fisher: torch.Tensor, kappa: float, split: str) -> torch.Tensor:
    return torch.ones_like(fisher) if split == "hard" else fisher / (fisher + kappa)


def _gate(x: torch.Tensor, config) -> torch.Tensor:
    return 1 + config.beta * torch.sigmoid(x.abs() - config.tau)


def _dense_terms(dw, dw_a, l_a, rie_sum, size, on_s, max_abs, config) -> dict:
    dw_t = dw - dw_a  # (out, in)
    a_sq, t_sq = (dw_a * dw_a).sum(), (dw_t * dw_t).sum()
    inner = (dw_a * dw_t).sum()
    return {
        "L_A": l_a,
        "L_T": t_sq,
        "E_rie": rie_sum / max(size, 1),
        "E_geo": inner * inner / (a_sq * t_sq + config.eps),
        "on_support": on_s,
        "dw_sq": (dw * dw).sum(),
        "max_abs": max_abs,
    }


def coordinate_terms(dw: torch.Tensor, block: CoordinateBlock, config) -> dict:
    """Every term of one module with dense (out, in) masks: m, F̂ zero off S, a boolean support."""
    out_f, in_f = block.shape
    flat = block.index.long()
    fisher = block.fisher.to(F64)
    m = torch.zeros(out_f * in_f, dtype=F64)
    fhat = torch.zeros(out_f * in_f, dtype=F64)
    support = torch.zeros(out_f * in_f, dtype=torch.bool)
    m[flat], fhat[flat], support[flat] = _weights(fisher, block.kappa, config.split), fisher / block.norm, True
    m, fhat, support = m.view(out_f, in_f), fhat.view(out_f, in_f), support.view(out_f, in_f)
    dw_a = m * dw
    l_a = (fhat * dw_a * dw_a).sum()
    rie = (support * _gate(dw, config) * m * (1 - m) * dw * dw).sum()
    on_s = (support * dw * dw).sum()
    max_abs = (support * dw.abs()).max() if flat.numel() else dw.new_zeros(())
    return _dense_terms(dw, dw_a, l_a, rie, flat.numel(), on_s, max_abs, config)


def kfac_terms(dw: torch.Tensor, block: KFACBlock, config) -> dict:
    """Every term of one module by dense projection C = Uᵀ ΔW V and ΔW_A = U (m ⊙ C) Vᵀ."""
    out_f = block.shape[0]
    U = torch.eye(out_f, dtype=F64) if block.U is None else block.U.to(F64)  # (out, k_out)
    V = block.V.to(F64)  # (in, k_in)
    fisher = torch.outer(block.mu.to(F64), block.lam.to(F64))  # (k_out, k_in)
    m = _weights(fisher, block.kappa, config.split)
    C = U.t() @ dw @ V  # (k_out, k_in)
    dw_a = U @ (m * C) @ V.t()  # (out, in)
    l_a = (fisher / block.norm * (m * C) ** 2).sum()
    rie = (_gate(C, config) * m * (1 - m) * C * C).sum()
    return _dense_terms(dw, dw_a, l_a, rie, C.numel(), (C * C).sum(), C.abs().max(), config)


def reference(factors: dict[str, tuple], blocks: dict, config, scale: float = 1.0) -> dict:
    """Per-module terms, summed terms and the weighted total, all float64 and differentiable in the factors."""
    per = {}
    for name, (A, B, s) in factors.items():
        dw = s * B.to(F64) @ A.to(F64)  # (out, in), materialised
        block = blocks[name]
        per[name] = coordinate_terms(dw, block, config) if isinstance(block, CoordinateBlock) else kfac_terms(
            dw, block, config
        )
    sums = {k: torch.stack([p[k] for p in per.values()]).sum() for k in ("L_A", "L_T", "E_rie", "E_geo")}
    c = config
    collision = c.alpha * sums["E_rie"] + (1 - c.alpha) * sums["E_geo"]
    total = scale * (c.lambda_a * sums["L_A"] + c.lambda_t * sums["L_T"] + c.lambda_nc * collision)
    on_s = sum(p["on_support"] for p in per.values())
    dw_sq = sum(p["dw_sq"] for p in per.values())
    share = on_s / dw_sq if float(dw_sq.detach()) > 0 else torch.zeros((), dtype=F64)
    max_abs = torch.stack([p["max_abs"] for p in per.values()]).max()
    return {"per_module": per, **sums, "total": total, "protected_share": share, "max_abs_dw_s": max_abs}


def random_fisher(shapes: dict[str, tuple[int, int]], seed: int) -> dict[str, torch.Tensor]:
    """Heavy-tailed positive random 'Fisher' tensors, one (out, in) per module, with per-module scale."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, shape) in enumerate(shapes.items()):
        out[name] = torch.rand(shape, generator=gen, dtype=F64) ** 4 * (1 + 0.2 * (i % 3)) + 1e-6
    return out


def coordinate_blocks(shapes: dict, rho: float, budget: str, seed: int = 0) -> dict[str, CoordinateBlock]:
    """Top-ρ coordinate blocks (sorted int32 index, float32 F) under a global or per-module budget."""
    fisher = random_fisher(shapes, seed)
    if budget == "global":
        values = torch.cat([f.flatten() for f in fisher.values()])
        top = values.topk(max(1, math.ceil(rho * values.numel()))).values
        thresholds = {n: float(top.min()) for n in fisher}
        norms = {n: float(top.mean()) for n in fisher}
    else:
        tops = {n: f.flatten().topk(max(1, math.ceil(rho * f.numel()))).values for n, f in fisher.items()}
        thresholds = {n: float(t.min()) for n, t in tops.items()}
        norms = {n: float(t.mean()) for n, t in tops.items()}
    blocks = {}
    for name, f in fisher.items():
        index = torch.nonzero(f.flatten() >= thresholds[name]).flatten()  # sorted ascending
        blocks[name] = CoordinateBlock(tuple(f.shape), index.to(torch.int32), f.flatten()[index].float(),
                                       norms[name], thresholds[name])
    return blocks


def kfac_blocks(shapes: dict, k_in: int, k_out, seed: int = 0) -> dict[str, KFACBlock]:
    """K-FAC blocks with float64 orthonormal U (or None for k_out='all'), V and positive μ, λ."""
    gen = torch.Generator().manual_seed(seed)
    blocks = {}
    for name, (out_f, in_f) in shapes.items():
        V = torch.linalg.qr(torch.randn(in_f, k_in, generator=gen, dtype=F64)).Q  # (in, k_in)
        U = None if k_out == "all" else torch.linalg.qr(torch.randn(out_f, k_out, generator=gen, dtype=F64)).Q
        mu = torch.rand(out_f if U is None else k_out, generator=gen, dtype=F64) + 0.1
        lam = torch.rand(k_in, generator=gen, dtype=F64) * 3 + 0.05
        fisher = torch.outer(mu, lam)
        blocks[name] = KFACBlock((out_f, in_f), U, V, mu, lam, float(fisher.mean()), float(fisher.min()))
    return blocks
