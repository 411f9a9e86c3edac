"""Worker for the kill test: saves two alternating masks to argv[1] forever, announcing each save."""

from __future__ import annotations

import sys

import torch

from agl_core.blocks import CoordinateBlock
from agl_core.config import AGLConfig
from agl_core.mask import FisherMask

N = 6_000_000  # protected coordinates per mask: ~48 MB, a save takes ~100+ ms


def build_masks() -> list[FisherMask]:
    """Two different, deterministic masks of the same size."""
    masks = []
    for variant in range(2):
        index = torch.arange(variant, 2 * N, 2, dtype=torch.int32)  # (N,) sorted, distinct per variant
        fisher = torch.linspace(1.0, 2.0 + variant, N)  # (N,)
        block = CoordinateBlock((4000, 3000), index, fisher, float(fisher.mean()), 1.0)
        masks.append(FisherMask({"model.layers.0.mlp.up_proj": block}, AGLConfig(), {"variant": variant}))
    return masks


def main(path: str) -> None:
    masks = build_masks()
    i = 0
    while True:
        print(f"save {i}", flush=True)
        masks[i % 2].save(path)
        i += 1


if __name__ == "__main__":
    main(sys.argv[1])
