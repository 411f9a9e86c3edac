"""FisherMask: the protected support (coordinates or K-FAC eigen-blocks), built from a Fisher, saved safely."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import nn

from . import maskio
from .blocks import Block, CoordinateBlock
from .config import AGLConfig
from .fingerprint import check_fingerprint, model_fingerprint
from .kfac import kfac_blocks
from .selection import coordinate_blocks

FORMAT_VERSION = maskio.FORMAT_VERSION
EMPTY_KEY = "empty_modules"  # metadata: covered modules that ended up with no protected coordinate
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(eq=False)
class FisherMask:
    """Per-module protected blocks keyed by base-model module name, plus metadata."""

    blocks: dict[str, Block]
    config: AGLConfig  # the config the mask was built with (mask fields: rho, budget, basis, k_in, k_out, ...)
    metadata: dict[str, Any] = field(default_factory=dict)  # fingerprint, estimator, data provenance, ...

    @classmethod
    def from_fisher(
        cls,
        fisher: Mapping[str, Any],
        config: AGLConfig,
        *,
        reference: Optional[Mapping[str, torch.Tensor]] = None,
        model: Optional[nn.Module] = None,
        metadata: Optional[dict[str, Any]] = None,
    ) -> "FisherMask":
        """Select the protected support from a Fisher (coordinate: name → (out, in); kfac: name → KFACStats).

        reference: basis=kfac only, name → (in, in) reference input covariance for a contrastive basis.
        model: the base model the Fisher was estimated on; its fingerprint is stored for check_model.
        metadata: merged into the mask's metadata (estimator, data provenance, ...).
        """
        if not isinstance(config, AGLConfig):
            raise ValueError(f"config must be an AGLConfig, got {type(config).__name__}.")
        if metadata is not None and not isinstance(metadata, dict):
            raise ValueError(f"metadata must be a dict (JSON-serialisable values), got {type(metadata).__name__}.")
        if config.basis == "coordinate":
            if reference is not None:
                raise ValueError("reference= (a contrastive input covariance) applies to basis=kfac only.")
            blocks, empty = coordinate_blocks(fisher, config)
        else:
            blocks, empty = kfac_blocks(fisher, config, reference)
        meta: dict[str, Any] = {EMPTY_KEY: empty, "contrastive": reference is not None}
        if model is not None:
            meta["fingerprint"] = model_fingerprint(model, list(fisher))
        meta.update(metadata or {})
        return cls(blocks, config, meta)

    # ----- identity, state dict, files -----

    def state_dict(self) -> dict[str, Any]:
        """{"tensors": {"<module>::<field>": tensor}, "meta": JSON-able dict}: everything the mask holds."""
        tensors: dict[str, torch.Tensor] = {}
        modules = {}
        for name, block in self.blocks.items():
            tensors.update(maskio.block_tensors(name, block))
            modules[name] = maskio.block_meta(block)
        meta = {"config": self.config.mask_dict(), "modules": modules, "metadata": self.metadata}
        maskio.canonical_json(meta)  # fail early, with a clear message, on non-JSON metadata
        return {"tensors": tensors, "meta": meta}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "FisherMask":
        if not isinstance(state, Mapping) or "tensors" not in state or "meta" not in state:
            raise ValueError("A mask state dict has keys 'tensors' and 'meta' (from FisherMask.state_dict()).")
        blocks, config, metadata = maskio.blocks_from_state(dict(state["tensors"]), state["meta"])
        return cls(blocks, config, metadata)

    def identity(self) -> str:
        """Short hash of the mask content (blocks, config, metadata), e.g. to tie a checkpoint to its mask."""
        state = self.state_dict()
        return maskio.content_hash(state["tensors"], state["meta"])[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FisherMask) and self.identity() == other.identity()

    __hash__ = None  # mutable

    def save(self, path) -> str:
        """Write the mask atomically to `path` (a *.safetensors file, or a folder → folder/mask.safetensors)."""
        state = self.state_dict()
        return maskio.save_state(path, state["tensors"], state["meta"])

    @classmethod
    def load(cls, path) -> "FisherMask":
        """Read a mask written by save(); ValueError says what is wrong with a missing or damaged file."""
        tensors, meta = maskio.load_state(path)
        return cls.from_state_dict({"tensors": tensors, "meta": meta})

    @staticmethod
    def file_info(path) -> dict[str, Any]:
        """A saved mask's meta (config, modules, metadata, created_at, agl_core_version, ...), tensors unread."""
        return maskio.read_info(path)

    # ----- model check and report -----

    def covered_modules(self) -> dict[str, list[int]]:
        """name → [out, in] of every module the mask covers, including those with an empty support."""
        covered = {n: list(b.shape) for n, b in self.blocks.items()}
        covered.update({n: list(s) for n, s in self.metadata.get(EMPTY_KEY, {}).items()})
        return covered

    def check_model(self, model: nn.Module) -> None:
        """ValueError if `model` is not the base model the mask was estimated on; warns without a fingerprint."""
        saved = self.metadata.get("fingerprint")
        if not saved:
            warnings.warn(
                "This mask carries no base-model fingerprint, so it cannot be checked against the model; "
                "re-create it with FisherMask.from_fisher(..., model=model) to enable the check.",
                stacklevel=2,
            )
            return
        for note in check_fingerprint(saved, model):
            warnings.warn(note, stacklevel=2)

    def summary(self) -> list[dict[str, Any]]:
        """Rows per covered module: name, layer, module_type, kind, protected, fraction, share of the whole S."""
        total = sum(b.size for b in self.blocks.values())
        rows = []
        for name, (out_f, in_f) in self.covered_modules().items():
            block = self.blocks.get(name)
            size = block.size if block is not None else 0
            match = _LAYER.search(name)
            rows.append({
                "name": name,
                "layer": int(match.group(1)) if match else None,
                "module_type": name.rsplit(".", 1)[-1],
                "kind": "empty" if block is None else ("coordinate" if isinstance(block, CoordinateBlock) else "kfac"),
                "protected": size,
                "fraction": size / (out_f * in_f),
                "share": size / total if total else 0.0,
            })
        return rows
