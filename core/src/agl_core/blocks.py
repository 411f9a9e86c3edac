"""Per-module protected blocks: what a mask stores and what the penalty reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def split_weights(fisher: torch.Tensor, kappa: float, split: str) -> torch.Tensor:
    """m on the support: soft F / (F + κ) (in [0.5, 1) when κ = min F), or hard 1."""
    if split == "hard":
        return torch.ones_like(fisher)
    return fisher / (fisher + kappa)


@dataclass
class CoordinateBlock:
    """basis=coordinate: the protected coordinates S of one (out, in) weight.

    index: int32 (|S|,), flat row-major indices into the (out, in) weight, sorted ascending.
    fisher: float32 (|S|,), the raw Fisher F at those coordinates.
    norm: mean_S(F) used for F̂ = F / norm (global mean under budget=global, else this module's).
    kappa: κ of the soft split (smallest F in S, global or this module's).
    """

    shape: tuple[int, int]
    index: torch.Tensor
    fisher: torch.Tensor
    norm: float
    kappa: float

    @property
    def size(self) -> int:
        return int(self.index.numel())

    def rows_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, col) int64 indices of S, each (|S|,)."""
        idx = self.index.long()
        return idx // self.shape[1], idx % self.shape[1]

    def fhat(self) -> torch.Tensor:
        return self.fisher / self.norm

    def weights(self, split: str) -> torch.Tensor:
        return split_weights(self.fisher, self.kappa, split)


@dataclass
class KFACBlock:
    """basis=kfac: the protected eigen-block C = Uᵀ ΔW V of one (out, in) weight.

    U: (out, k_out) orthonormal columns, or None for k_out=all (U = I, only the input side).
    V: (in, k_in) orthonormal columns.
    mu: (k_out,) output-side weights (G eigenvalues); (out,) when U is None (G's diagonal, or ones).
    lam: (k_in,) input-side weights (X eigenvalues, or contrastive energies).
    The block Fisher is F_ab = mu_a · lam_b; norm and kappa as in CoordinateBlock, over this block.
    """

    shape: tuple[int, int]
    U: Optional[torch.Tensor]
    V: torch.Tensor
    mu: torch.Tensor
    lam: torch.Tensor
    norm: float
    kappa: float

    @property
    def size(self) -> int:
        return int(self.mu.numel() * self.lam.numel())

    def fisher(self) -> torch.Tensor:
        """(k_out or out, k_in) block Fisher μ_a λ_b."""
        return torch.outer(self.mu, self.lam)

    def fhat(self) -> torch.Tensor:
        return self.fisher() / self.norm

    def weights(self, split: str) -> torch.Tensor:
        return split_weights(self.fisher(), self.kappa, split)


Block = CoordinateBlock | KFACBlock


@dataclass
class KFACStats:
    """K-FAC statistics of one linear layer from alignment data (sums, divide by `count` for means).

    X: (in, in) Σ x xᵀ over tokens; G: (out, out) Σ g gᵀ over tokens; count: number of tokens summed.
    """

    X: torch.Tensor
    G: torch.Tensor
    count: int

    def input_cov(self) -> torch.Tensor:
        return self.X / max(self.count, 1)

    def output_cov(self) -> torch.Tensor:
        return self.G / max(self.count, 1)
