"""FisherMask: the protected support (coordinates or K-FAC eigen-blocks), built from a Fisher, saved safely."""
# SKELETON — to be implemented (see the helper brief). Public surface below is the contract.

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .blocks import Block
from .config import AGLConfig

FORMAT_VERSION = 1


@dataclass
class FisherMask:
    """Per-module protected blocks keyed by base-model module name, plus metadata."""

    blocks: dict[str, Block]
    config: AGLConfig  # the config the mask was built with (mask fields: rho, budget, basis, k_in, k_out, ...)
    metadata: dict[str, Any] = field(default_factory=dict)  # fingerprint, estimator, data provenance, ...

    @classmethod
    def from_fisher(cls, fisher, config: AGLConfig, *, reference=None, metadata=None) -> "FisherMask":
        raise NotImplementedError

    def save(self, path) -> str:
        raise NotImplementedError

    @classmethod
    def load(cls, path) -> "FisherMask":
        raise NotImplementedError
