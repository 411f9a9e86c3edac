"""agl_axolotl: AGL for Axolotl as a plugin (`plugins: [agl_axolotl.AGLPlugin]` plus an `agl:` block)."""

from __future__ import annotations

from typing import Any

# Lazy exports: the agl_plugins entry point imports agl_axolotl.plugin, which must not pull in axolotl,
# transformers or pydantic; Axolotl imports `agl_axolotl.AGLPlugin` itself when a YAML lists it.
_EXPORTS = {
    "AGLPlugin": "axolotl_plugin",
    "AGLArgs": "args",
    "AGLOptions": "args",
    "AxolotlAGLCallback": "adapter",
    "AxolotlTrainerAdapter": "adapter",
    "ensure_mask": "masks",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'agl_axolotl' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
