"""Mask storage (issue #8, item 4): bytes per protected coordinate on disk and in memory.

Masks over every linear layer of SmolLM2-135M and of one Llama-7B-like layer (random Fisher, global budget,
built with FisherMask.from_fisher exactly as `agl fisher` builds them), saved with FisherMask.save. In memory:
the mask's tensors, and the bound AGLPenalty's fused cache on top of it (a LoRA r=8 model on the meta device).
Run: python -m bench.storage
"""

from __future__ import annotations

import os
import tempfile

import torch

from bench.common import bare_model, llama_layer_shapes, smollm2_shapes


def random_fisher(shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=gen) ** 4 for n, s in shapes.items()}


def tensor_bytes(mask) -> int:
    total = 0
    for block in mask.blocks.values():
        for t in (block.index, block.fisher):
            total += t.numel() * t.element_size()
    return total


def main() -> None:
    from agl_core import AGLConfig, AGLPenalty, FisherMask

    cases = [("SmolLM2-135M, all linear", smollm2_shapes()), ("Llama-7B-like, 1 layer", llama_layer_shapes("model.layers.0", 4096, 4096, 11008))]
    print("# bench.storage: bytes per protected coordinate (target ≤ 12)")
    print("| model | ρ | \\|S\\| | file | on disk B/coord | mask in memory B/coord | + penalty cache B/coord |")
    print("|---|---|---|---|---|---|---|")
    for label, shapes in cases:
        fisher = random_fisher(shapes)
        for rho in (0.001, 0.01, 0.10):
            cfg = AGLConfig(rho=rho)
            mask = FisherMask.from_fisher(fisher, cfg)
            size = sum(b.size for b in mask.blocks.values())
            with tempfile.TemporaryDirectory() as tmp:
                path = mask.save(os.path.join(tmp, "mask.safetensors"))
                disk = os.path.getsize(path)
            model = bare_model(shapes, 8, torch.device("cpu"))
            pen = AGLPenalty(model, mask, cfg, check_fingerprint=False)
            cache = sum(g.nbytes() for _, g in pen._groups())
            print(f"| {label} | {rho:g} | {size:,} | {disk / 2**20:.1f} MiB | {disk / size:.2f} | "
                  f"{tensor_bytes(mask) / size:.2f} | {cache / size:.2f} |", flush=True)
            del model, pen, mask


if __name__ == "__main__":
    main()
