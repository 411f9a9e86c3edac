"""agl_hf_callback: AGL for the Hugging Face Trainer through a TrainerCallback."""

from __future__ import annotations

from typing import Any

# Lazy exports: the agl_plugins entry point imports agl_hf_callback.plugin, which must not pull in transformers.
_EXPORTS = {
    "AGLCallback": "callback",
    "METRIC_KEYS": "callback",
    "HFTrainerAdapter": "adapter",
    "STATE_FILE": "state",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'agl_hf_callback' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
