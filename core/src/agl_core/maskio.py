"""Mask (de)serialisation: flat tensors + JSON meta, content hash, validation, one safetensors file."""

from __future__ import annotations

import hashlib
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Union

import torch

from .blocks import Block, CoordinateBlock, KFACBlock
from .config import AGLConfig
from .safeio import atomic_write, update_hash

FORMAT_NAME = "agl-mask"
FORMAT_VERSION = 1
READABLE_VERSIONS = ("1",)
FILE_NAME = "mask.safetensors"
SEP = "::"
CREATE_CMD = "`agl fisher --model <base model> --data <alignment data> --out <path>`"


def block_tensors(name: str, block: Block) -> dict[str, torch.Tensor]:
    """The tensors of one block, named `<module>::<field>`."""
    if isinstance(block, CoordinateBlock):
        fields = {"index": block.index, "fisher": block.fisher}
    else:
        fields = {"V": block.V, "mu": block.mu, "lam": block.lam}
        if block.U is not None:
            fields["U"] = block.U
    return {f"{name}{SEP}{k}": v.detach().cpu().contiguous() for k, v in fields.items()}


def block_meta(block: Block) -> dict[str, Any]:
    kind = "coordinate" if isinstance(block, CoordinateBlock) else "kfac"
    return {"kind": kind, "shape": list(block.shape), "norm": float(block.norm), "kappa": float(block.kappa)}


def content_hash(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """sha256 over the canonical JSON meta and every tensor (name, dtype, shape, bytes), in name order."""
    hasher = hashlib.sha256(canonical_json(meta).encode())
    for name in sorted(tensors):
        t = tensors[name]
        hasher.update(f"\n{name}|{t.dtype}|{list(t.shape)}\n".encode())
        update_hash(hasher, t)
    return hasher.hexdigest()


def canonical_json(obj: Any) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"Mask metadata must be JSON-serialisable (str/int/float/bool/None, lists, dicts; no NaN): {err}. "
            "Convert tensors and paths to plain values before passing metadata=."
        ) from None


def _fail(where: str, what: str) -> ValueError:
    return ValueError(f"Inconsistent mask ({where}): {what}. The mask is corrupt; re-create it with {CREATE_CMD}.")


def _get(tensors: dict, name: str, field: str, dims: int) -> torch.Tensor:
    key = f"{name}{SEP}{field}"
    if key not in tensors:
        raise _fail(name, f"tensor {key!r} is missing")
    t = tensors[key]
    if not isinstance(t, torch.Tensor):
        raise _fail(name, f"{key} is a {type(t).__name__}, not a tensor")
    if t.dim() != dims:
        raise _fail(name, f"{key} has {t.dim()} dimensions, expected {dims}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise _fail(name, f"{key} has NaN/inf entries")
    return t


def _coordinate_block(name: str, info: dict, tensors: dict) -> CoordinateBlock:
    out_f, in_f = info["shape"]
    index, fisher = _get(tensors, name, "index", 1), _get(tensors, name, "fisher", 1)
    if index.dtype != torch.int32 or fisher.dtype != torch.float32:
        raise _fail(name, f"index must be int32 and fisher float32, got {index.dtype} / {fisher.dtype}")
    if index.numel() != fisher.numel() or index.numel() == 0:
        raise _fail(name, f"index has {index.numel()} entries and fisher {fisher.numel()} (must be equal, > 0)")
    if int(index.min()) < 0 or int(index.max()) >= out_f * in_f:
        raise _fail(name, f"index out of range [0, {out_f * in_f}) for shape {[out_f, in_f]}")
    if index.numel() > 1 and not bool((index[1:] > index[:-1]).all()):
        raise _fail(name, "index is not sorted ascending without repeats")
    if not bool((fisher > 0).all()):
        raise _fail(name, "fisher has entries ≤ 0 (only positive Fisher values are protected)")
    return CoordinateBlock((out_f, in_f), index, fisher, info["norm"], info["kappa"])


def _kfac_block(name: str, info: dict, tensors: dict) -> KFACBlock:
    out_f, in_f = info["shape"]
    v, mu, lam = (_get(tensors, name, f, d) for f, d in (("V", 2), ("mu", 1), ("lam", 1)))
    u = _get(tensors, name, "U", 2) if f"{name}{SEP}U" in tensors else None
    if v.shape[0] != in_f or v.shape[1] != lam.numel():
        raise _fail(name, f"V is {list(v.shape)} and lam has {lam.numel()} entries for in_features {in_f}")
    k_out = out_f if u is None else u.shape[1]
    if (u is not None and u.shape[0] != out_f) or mu.numel() != k_out:
        got = "None" if u is None else list(u.shape)
        raise _fail(name, f"U is {got} and mu has {mu.numel()} entries for out_features {out_f}")
    if not all(t.is_floating_point() for t in (v, mu, lam) + (() if u is None else (u,))):
        raise _fail(name, "U, V, mu and lam must be float tensors")
    if bool((mu < 0).any()) or bool((lam < 0).any()):
        raise _fail(name, "mu or lam has negative entries")
    return KFACBlock((out_f, in_f), u, v, mu, lam, info["norm"], info["kappa"])


def _block(name: str, info: Any, tensors: dict) -> Block:
    if not isinstance(info, dict) or info.get("kind") not in ("coordinate", "kfac"):
        raise _fail(name, f"module entry {info!r} lacks kind 'coordinate' or 'kfac'")
    shape = info.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise _fail(name, f"shape {shape!r} is not [out, in] with positive integers")
    for key in ("norm", "kappa"):
        if not (isinstance(info.get(key), (int, float)) and math.isfinite(info[key]) and info[key] > 0):
            raise _fail(name, f"{key}={info.get(key)!r} must be a finite number > 0")
    builder = _coordinate_block if info["kind"] == "coordinate" else _kfac_block
    return builder(name, info, tensors)


def blocks_from_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> tuple[dict, AGLConfig, dict]:
    """(blocks, config, metadata) from a state dict, validating everything."""
    if not isinstance(meta, dict) or not all(k in meta for k in ("config", "modules", "metadata")):
        raise _fail("meta", "it must hold 'config', 'modules' and 'metadata'")
    try:
        config = AGLConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as err:
        raise _fail("config", str(err)) from None
    modules = meta["modules"]
    if not isinstance(modules, dict) or not isinstance(meta["metadata"], dict):
        raise _fail("meta", "'modules' and 'metadata' must be dicts")
    expected = set()
    blocks = {}
    for name, info in modules.items():
        blocks[name] = _block(name, info, tensors)
        expected |= set(block_tensors(name, blocks[name]))
    extra = sorted(set(tensors) - expected)
    if extra:
        raise _fail("tensors", f"tensors {extra[:3]} belong to no module listed in the meta")
    return blocks, config, dict(meta["metadata"])


def resolve_path(path: Union[str, os.PathLike], for_write: bool) -> Path:
    """A `*.safetensors` file as given, anything else is a folder holding `mask.safetensors`."""
    p = Path(path).expanduser()
    if p.suffix == ".safetensors" and not p.is_dir():
        return p
    if for_write and p.exists() and not p.is_dir():
        raise ValueError(f"Cannot save a mask to {str(p)!r}: it is a file without the .safetensors suffix.")
    return p / FILE_NAME


def save_state(path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    """Write one safetensors file atomically, meta embedded as JSON in the header's __metadata__."""
    from safetensors.torch import save_file

    file_meta = dict(meta, content_sha256=content_hash(tensors, meta))
    file_meta["created_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    file_meta["agl_core_version"] = _version()
    meta_json = json.dumps(file_meta, allow_nan=False, ensure_ascii=False)  # keeps module order (hash is order-free)
    header = {"agl_format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), "meta": meta_json}
    target = resolve_path(path, for_write=True)
    return atomic_write(target, lambda tmp: save_file(tensors, tmp, metadata=header))


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("agl-core")
    except Exception:  # not installed as a distribution (e.g. run from a source tree)
        return "unknown"


def _open(file: Path) -> Any:
    """An open safe_open handle (use with `with`); ValueError when the file is missing or not safetensors."""
    from safetensors import safe_open

    if not file.is_file():
        raise ValueError(f"No AGL mask at {str(file)!r}: the file does not exist; create one with {CREATE_CMD}.")
    try:
        return safe_open(str(file), framework="pt")
    except Exception as err:  # safetensors raises its own SafetensorError for bad/truncated files
        raise ValueError(
            f"{str(file)!r} is not a readable safetensors file (truncated, or another format): {err}. "
            f"Re-create the mask with {CREATE_CMD}."
        ) from None


def _file_meta(file: Path, header: dict[str, str]) -> dict[str, Any]:
    """The JSON meta of an AGL mask header, after checking the format name and version."""
    if header.get("agl_format") != FORMAT_NAME:
        raise ValueError(
            f"{str(file)!r} is a safetensors file but not an AGL mask (its header has no agl_format='{FORMAT_NAME}'); "
            f"pass the file written by `agl fisher` / FisherMask.save, or create one with {CREATE_CMD}."
        )
    version = header.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{str(file)!r} is an AGL mask of format_version {version!r}; this agl_core ({_version()}) reads "
            f"format_version {', '.join(READABLE_VERSIONS)}. Upgrade agl-core, or re-create the mask with {CREATE_CMD}."
        )
    try:
        meta = json.loads(header.get("meta", ""))
    except json.JSONDecodeError as err:
        raise _fail("header", f"its meta is not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise _fail("header", "its meta is not a JSON object")
    return meta


def read_info(path) -> dict[str, Any]:
    """The file's meta (config, modules, metadata, created_at, agl_core_version, content_sha256) and its path,
    without reading the tensors or checking the content hash: cheap, for listing masks."""
    file = resolve_path(path, for_write=False)
    with _open(file) as handle:
        meta = _file_meta(file, handle.metadata() or {})
    return dict(meta, path=str(file), file_bytes=file.stat().st_size)


def load_state(path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) from a mask file, refusing anything that is not an intact AGL mask."""
    file = resolve_path(path, for_write=False)
    with _open(file) as handle:  # one open file: header and tensors come from the same version of it
        meta = _file_meta(file, handle.metadata() or {})
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    stored = meta.pop("content_sha256", None)
    meta.pop("created_at", None), meta.pop("agl_core_version", None)
    if stored != content_hash(tensors, meta):
        raise ValueError(
            f"Content hash mismatch in {str(file)!r}: the tensors or meta were modified after the mask was "
            f"written (or the file is damaged). Re-create the mask with {CREATE_CMD}."
        )
    return tensors, meta
