"""agl_plugins registration of the TRL (SFT, DPO) trainer adapter (recognises no trainer yet)."""

from __future__ import annotations

from typing import Any, Optional

from agl_plugins.hookspecs import hookimpl


@hookimpl
def agl_adapter_for_trainer(trainer: Any, config: Any) -> Optional[Any]:
    """The SFTTrainer / DPOTrainer adapter lands with its own issue; until then no trainer is recognised."""
    return None
