"""One base model serving several PEFT LoRA adapters: parsing, fit checks, loading and switching."""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from agl_core.modules import PEFT_PREFIX, logical_weight

BASE = "base"  # the model name DriftCheck gives the base model (adapters off)
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
               "vocab_size")
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def parse_adapters(items: Optional[Sequence[str]]) -> dict[str, str]:
    """['agl=out/agl', 'plain=out/plain'] → {'agl': 'out/agl', 'plain': 'out/plain'}; ValueError if malformed."""
    adapters: dict[str, str] = {}
    for item in items or ():
        name, sep, folder = str(item).partition("=")
        name = name.strip()
        if not sep or not folder.strip():
            raise ValueError(f"--adapter {item!r} is malformed: write NAME=FOLDER, e.g. --adapter agl=out/agl-lora.")
        check_name(name)
        if name in adapters:
            raise ValueError(f"The adapter name {name!r} is given twice; give each adapter its own name.")
        adapters[name] = folder.strip()
    return adapters


def check_name(name: str) -> None:
    if name == BASE or not NAME.fullmatch(name):
        raise ValueError(f"Adapter name {name!r} is invalid: use letters, digits, '_' or '-' (starting with a "
                         f"letter, at most 64 characters), and not {BASE!r}, which names the base model.")


def read_adapter_config(name: str, folder: str) -> dict[str, Any]:
    """adapter_config.json of a PEFT folder; ValueError when the folder is not one."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ValueError(f"Adapter {name!r}: {folder!r} is not a folder; pass a PEFT adapter folder "
                         "(written by PeftModel.save_pretrained).")
    cfg_file = path / "adapter_config.json"
    if not cfg_file.is_file():
        raise ValueError(f"Adapter {name!r}: {folder!r} has no adapter_config.json, so it is not a PEFT adapter "
                         "folder; pass the folder written by PeftModel.save_pretrained (or trainer.save_model).")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"Adapter {name!r}: {cfg_file} is not valid JSON ({err.msg}).") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"Adapter {name!r}: {cfg_file} must hold a JSON object.")
    return cfg


def adapter_shapes(name: str, folder: str) -> dict[str, tuple[int, ...]]:
    """{tensor key: shape} of the adapter weights, read without loading them (safetensors) or from a .bin."""
    path = Path(folder).expanduser()
    file = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)
    if file is None:
        raise ValueError(f"Adapter {name!r}: {folder!r} has no {' or '.join(WEIGHT_FILES)}; save the adapter "
                         "again with PeftModel.save_pretrained.")
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as handle:
                return {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        state = torch.load(file, map_location="cpu", weights_only=True)
        return {k: tuple(v.shape) for k, v in state.items()}
    except Exception as err:  # truncated or foreign files: safetensors / pickle raise their own errors
        raise ValueError(f"Adapter {name!r}: {file} cannot be read ({err}); save the adapter again.") from None


def _module_shape(root: torch.nn.Module, path: str) -> Optional[tuple[int, int]]:
    """(out, in) of the linear layer at `path` in the plain base model, or None if there is none."""
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    while hasattr(module, "base_layer"):
        module = module.base_layer
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        return None
    return tuple(logical_weight(module).shape)  # type: ignore[return-value]


def shape_mismatches(shapes: dict[str, tuple[int, ...]], root: torch.nn.Module) -> list[str]:
    """Why the adapter's LoRA factors do not fit the base model's layers (empty when they all fit)."""
    problems = []
    for key, shape in sorted(shapes.items()):
        kind = "A" if ".lora_A." in key else "B" if ".lora_B." in key else None
        if kind is None or len(shape) != 2:
            continue
        path = key.split(".lora_")[0]
        path = path[len(PEFT_PREFIX):] if path.startswith(PEFT_PREFIX) else path
        base = _module_shape(root, path)
        if base is None:
            problems.append(f"{path} does not exist in the base model")
        elif kind == "A" and shape[1] != base[1]:
            problems.append(f"{path}: lora_A is {list(shape)} but the layer takes {base[1]} inputs")
        elif kind == "B" and shape[0] != base[0]:
            problems.append(f"{path}: lora_B is {list(shape)} but the layer has {base[0]} outputs")
    return problems


def base_name_note(name: str, cfg: dict[str, Any], base_config: Any, model_spec: str) -> Optional[str]:
    """ValueError when the adapter's recorded base is a local model of another architecture; a note when its
    name differs from the base given (the shapes still decide); None when they agree or nothing is recorded."""
    recorded = cfg.get("base_model_name_or_path")
    if not recorded:
        return None
    folder = Path(str(recorded)).expanduser()
    if (folder / "config.json").is_file():
        theirs = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        diff = [f"{k}: {theirs.get(k)} vs {getattr(base_config, k, None)}" for k in ARCH_FIELDS
                if k in theirs and theirs.get(k) != getattr(base_config, k, None)]
        if diff:
            raise ValueError(f"Adapter {name!r} was trained on {recorded!r}, a different model than --model "
                             f"{model_spec!r} ({'; '.join(diff)}). Pass the base model it was trained on.")
        return None
    mine = {Path(str(x)).name.lower() for x in (model_spec, getattr(base_config, "_name_or_path", "")) if x}
    if Path(str(recorded)).name.lower() not in mine:
        return (f"Adapter {name!r} records base model {recorded!r}, evaluated on {model_spec!r}: the layer shapes "
                "fit, but make sure it is the same base model.")
    return None


def check_adapter(name: str, folder: str, root: torch.nn.Module, base_config: Any, model_spec: str) -> Optional[str]:
    """ValueError if the adapter does not fit the base model; returns a note worth reporting, or None."""
    cfg = read_adapter_config(name, folder)
    note = base_name_note(name, cfg, base_config, model_spec)
    problems = shape_mismatches(adapter_shapes(name, folder), root)
    if problems:
        shown = "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
        trained = cfg.get("base_model_name_or_path") or "an unrecorded base"
        raise ValueError(f"Adapter {name!r} ({folder}) does not fit the base model {model_spec!r}: {shown}. "
                         f"It was trained on {trained!r}; pass that base model with --model.")
    return note


def adapter_digest(folder: str) -> str:
    """SHA-256 (16 hex digits) of the adapter's config and weights: a retrained adapter is a new run."""
    digest = hashlib.sha256()
    path = Path(folder).expanduser()
    for fname in ("adapter_config.json",) + WEIGHT_FILES:
        if (path / fname).is_file():
            with (path / fname).open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def attach_adapters(base: torch.nn.Module, adapters: dict[str, str], model_spec: str) -> tuple[Any, list[str]]:
    """(PeftModel holding every adapter, notes) — or (base, []) without adapters. Checks each one first."""
    if not adapters:
        return base, []
    try:
        from peft import PeftModel
    except ImportError:
        raise ValueError("Evaluating --adapter folders needs the peft package: pip install peft.") from None
    notes, model = [], base
    for i, (name, folder) in enumerate(adapters.items()):
        root = model.get_base_model() if i else base
        note = check_adapter(name, folder, root, base.config, model_spec)
        if note:
            notes.append(note)
        try:
            if i == 0:
                model = PeftModel.from_pretrained(base, str(Path(folder).expanduser()), adapter_name=name)
            else:
                model.load_adapter(str(Path(folder).expanduser()), adapter_name=name)
        except (RuntimeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"Adapter {name!r} ({folder}) could not be loaded on {model_spec!r}: "
                             f"{str(err).splitlines()[0]}") from None
    return model.eval(), notes


@contextmanager
def active(model: Any, name: str) -> Iterator[Any]:
    """Run `model` as `name`: the base model (adapters disabled) or one adapter (set as the active one)."""
    if name == BASE:
        if callable(getattr(model, "disable_adapter", None)):
            with model.disable_adapter():
                yield model
        else:
            yield model
        return
    model.set_adapter(name)
    yield model
