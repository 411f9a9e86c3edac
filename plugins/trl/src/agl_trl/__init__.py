"""agl_trl: AGL for TRL SFT and DPO trainers and scripts."""

from __future__ import annotations

from typing import Any

# Lazy exports: the agl_plugins entry point imports agl_trl.plugin, which must not pull in trl or transformers.
_EXPORTS = {
    "AGLLossMixin": "loss",
    "AGLLossTerm": "loss",
    "loss_is_scaled_for_ga": "loss",
    "TRLTrainerAdapter": "adapter",
    "TRLMetricsSink": "adapter",
    "AutoAttach": "autoattach",
    "AGLStartError": "autoattach",
    "make_parser": "args",
    "agl_arguments_class": "args",
    "main": "cli",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'agl_trl' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
