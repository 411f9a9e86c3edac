"""agl_plugins registration of the TRL adapter: recognises `trl.SFTTrainer` and `trl.DPOTrainer` (and subclasses)."""

from __future__ import annotations

import sys
from typing import Any, Optional

from agl_plugins.hookspecs import hookimpl

# (module, class) of the TRL trainers this adapter serves; read from sys.modules, never imported here.
TRAINERS = (("trl.trainer.sft_trainer", "SFTTrainer"), ("trl.trainer.dpo_trainer", "DPOTrainer"))


def trl_trainer_classes() -> tuple[type, ...]:
    """The TRL trainer classes already imported in this process (a trainer instance implies its module is)."""
    found = []
    for module_name, class_name in TRAINERS:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


@hookimpl
def agl_adapter_for_trainer(trainer: Any, config: Any) -> Optional[Any]:
    """A TRLTrainerAdapter for a `trl.SFTTrainer` / `trl.DPOTrainer` (or subclass), else None.

    A plain hookimpl: the HF plugin answers last (`trylast`) for any other `transformers.Trainer`, and the
    Axolotl plugin first (`tryfirst`) for Axolotl's trainers, which subclass TRL's.
    """
    if "trl" not in sys.modules:  # no TRL trainer can exist; keep `agl` start-up free of trl
        return None
    classes = trl_trainer_classes()
    if not classes or not isinstance(trainer, classes):
        return None
    from .adapter import TRLTrainerAdapter

    return TRLTrainerAdapter(trainer, config)
