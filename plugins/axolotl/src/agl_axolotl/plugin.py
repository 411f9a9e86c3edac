"""agl_plugins registration of the Axolotl adapter; never imports axolotl at import time."""

from __future__ import annotations

from typing import Any, Optional

from agl_plugins.hookspecs import hookimpl


@hookimpl
def agl_adapter_for_trainer(trainer: Any, config: Any) -> Optional[Any]:
    """The Axolotl adapter lands with its own issue; until then no trainer is recognised."""
    return None
