"""The agl_plugins adapter for a transformers Trainer: adds AGLCallback and routes its metrics into Trainer.log."""

from __future__ import annotations

import functools
import logging
from typing import Any, Optional

from agl_core import AGLConfig

from .callback import AGLCallback

logger = logging.getLogger(__name__)
_MARK = "__agl_log_wrapper__"


class HFTrainerAdapter:
    """AGL on one `transformers.Trainer` instance: its AGLCallback plus a wrapper of that instance's `log`.

    The wrapper merges the AGL window averages into each training log *before* `Trainer.log` appends it to
    `state.log_history` and hands it to the reporting callbacks (TensorBoard, W&B, ...), which a plain
    callback's `on_log` runs too late for. Nothing is assigned to a class or a module.
    """

    plugin = "agl_hf_callback"

    def __init__(self, trainer: Any, config: Optional[AGLConfig] = None, mask: Any = None) -> None:
        self.trainer = trainer
        self.callback = ensure_callback(trainer, config, mask)
        _wrap_log(trainer, self.callback)

    @property
    def penalty(self) -> Any:
        """The bound agl_core.AGLPenalty."""
        return self.callback.penalty

    def detach(self) -> None:
        """Remove the callback and the log wrapper from the trainer instance."""
        if getattr(self.trainer.__dict__.get("log"), _MARK, False):
            del self.trainer.log
        self.trainer.remove_callback(self.callback)

    def __repr__(self) -> str:
        modules = len(self.penalty.modules) if self.penalty is not None else 0
        name = type(self.trainer).__name__
        return f"HFTrainerAdapter({name}, {modules} LoRA modules, enabled={self.callback.enabled})"


def ensure_callback(trainer: Any, config: Optional[AGLConfig] = None, mask: Any = None) -> AGLCallback:
    """The trainer's AGLCallback (added if it has none), set up so start-up errors surface at attach()."""
    existing = _existing_callback(trainer)
    callback = existing if existing is not None else AGLCallback(config, mask)
    callback.setup(trainer.model, trainer.args)
    if existing is None:
        trainer.add_callback(callback)
    elif config not in (None, AGLConfig()) and config != callback.config:
        logger.warning("AGL: the trainer already has an AGLCallback; attach() keeps its config and ignores "
                       "the one passed to attach().")
    return callback


def _existing_callback(trainer: Any) -> Optional[AGLCallback]:
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AGLCallback)]
    if len(found) > 1:
        raise ValueError(f"The trainer has {len(found)} AGLCallback instances; keep one (the penalty would be "
                         "added once per callback).")
    return found[0] if found else None


def _wrap_log(trainer: Any, callback: AGLCallback) -> None:
    """Wrap `trainer.log` on this instance (idempotent): AGL metrics are merged into training logs first."""
    original = trainer.log
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def log(logs: dict, *args: Any, **kwargs: Any) -> Any:
        callback.merge_metrics(logs)
        return original(logs, *args, **kwargs)

    setattr(log, _MARK, True)
    trainer.log = log
