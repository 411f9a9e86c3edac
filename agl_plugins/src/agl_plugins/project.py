"""Post-hoc projection of a saved PEFT LoRA adapter off an AGL mask's protected input directions (a cheap baseline
to AGL training: the plain update, minus its part on the alignment-critical directions)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def project_adapter_dir(adapter: Any, mask: Any, out: Any, *, overwrite: bool = False) -> dict[str, Any]:
    """Write the projected adapter to `out` (a new PEFT folder, written atomically); returns what was done."""
    from safetensors.torch import load_file, save_file

    from agl_core.mask import FisherMask
    from agl_core.project import project_adapter
    from agl_core.safeio import atomic_write, atomic_write_bytes

    src, dest = Path(adapter).expanduser(), Path(out).expanduser()
    if not (src / WEIGHTS).is_file() or not (src / CONFIG).is_file():
        raise ValueError(f"{str(src)!r} is not a saved PEFT LoRA adapter (needs {WEIGHTS} and {CONFIG}).")
    if dest.resolve() == src.resolve():
        raise ValueError("The projected adapter must go to another folder than the adapter it comes from.")
    if (dest / WEIGHTS).exists() and not overwrite:
        raise ValueError(f"{str(dest)!r} already holds an adapter; pass overwrite=True (--overwrite) to replace it.")
    new, modules = project_adapter(load_file(str(src / WEIGHTS)), FisherMask.load(str(mask)))
    dest.mkdir(parents=True, exist_ok=True)
    for extra in src.iterdir():  # README, tokenizer files, ...: copied as they are
        if extra.is_file() and extra.name not in (WEIGHTS, CONFIG):
            shutil.copy2(extra, dest / extra.name)
    atomic_write(dest / WEIGHTS, lambda tmp: save_file(new, tmp, metadata={"format": "pt"}))
    info = {"adapter": str(src), "mask": str(mask), "out": str(dest), "projected_modules": len(modules)}
    atomic_write_bytes(dest / "agl_projection.json", json.dumps(info, indent=1).encode("utf-8"))
    atomic_write_bytes(dest / CONFIG, (src / CONFIG).read_bytes())  # last: the folder is loadable only when whole
    return info
