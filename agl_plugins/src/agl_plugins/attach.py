"""attach(): find the plugin adapter that recognises a trainer and hand it the AGL config."""

from __future__ import annotations

from typing import Any, Optional

import pluggy
from agl_core.config import AGLConfig

from .manager import get_plugin_manager, plugin_names


def _as_config(config: Any) -> AGLConfig:
    if config is None:
        return AGLConfig()
    if isinstance(config, AGLConfig):
        return config
    if isinstance(config, dict):
        return AGLConfig.from_dict(config)
    raise ValueError(
        f"attach() got config of type {type(config).__name__}; pass an agl_core.AGLConfig, a dict of its options, or None."
    )


def attach(trainer: Any, config: Any = None, *, pm: Optional[pluggy.PluginManager] = None) -> Any:
    """Return the adapter of the first plugin whose agl_adapter_for_trainer recognises `trainer`.

    `config`: an AGLConfig, a dict of its options, or None (defaults). `pm`: a plugin manager (default: a new
    one from `get_plugin_manager()`). Raises ValueError when no registered plugin recognises the trainer.
    """
    config = _as_config(config)
    pm = pm if pm is not None else get_plugin_manager()
    adapter = pm.hook.agl_adapter_for_trainer(trainer=trainer, config=config)
    if adapter is None:
        cls = type(trainer)
        raise ValueError(
            f"No AGL adapter recognises the trainer {cls.__module__}.{cls.__qualname__}; registered plugins: "
            f"{plugin_names(pm) or 'none'}. Install the adapter package for your trainer (agl-hf-callback, "
            "agl-trl, agl-axolotl) or register a plugin implementing agl_adapter_for_trainer."
        )
    return adapter
