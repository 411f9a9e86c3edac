"""agl_plugins registration of the Hugging Face Trainer adapter (any `transformers.Trainer` instance)."""

from __future__ import annotations

import sys
from typing import Any, Optional

from agl_plugins.hookspecs import hookimpl


@hookimpl(trylast=True)
def agl_adapter_for_trainer(trainer: Any, config: Any) -> Optional[Any]:
    """An HFTrainerAdapter for a `transformers.Trainer` (or subclass), else None.

    TRL and Axolotl trainers subclass Trainer: their plugins win the lookup with `tryfirst=True`.
    """
    if "transformers" not in sys.modules:  # nothing can be a Trainer; keep `agl` start-up free of transformers
        return None
    from transformers import Trainer

    if not isinstance(trainer, Trainer):
        return None
    from .adapter import HFTrainerAdapter

    return HFTrainerAdapter(trainer, config)
