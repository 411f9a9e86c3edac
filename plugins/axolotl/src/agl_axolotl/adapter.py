"""The agl_plugins adapter for Axolotl's trainers: AGLCallback whose metrics go through the trainer's own metric store."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

from agl_core import AGLConfig
from agl_hf_callback import AGLCallback

logger = logging.getLogger(__name__)

Sink = Callable[[dict], None]


def metric_sink(trainer: Any) -> Optional[Sink]:
    """Where the trainer collects its own per-step metrics, averaged into each log by its `log()`:

    Axolotl's `store_metrics(metrics, train_eval)` (AxolotlTrainer and subclasses), else TRL's
    `_metrics["train"][key]` lists (DPOTrainer, hence AxolotlDPOTrainer). None when it has neither.
    """
    store = getattr(trainer, "store_metrics", None)
    if callable(store):
        return lambda metrics: store(dict(metrics), train_eval="train")
    collected = getattr(trainer, "_metrics", None)
    if isinstance(collected, dict) and isinstance(collected.get("train"), dict):
        def append(metrics: dict) -> None:
            for key, value in metrics.items():
                collected["train"].setdefault(key, []).append(float(value))

        return append
    return None


class AxolotlAGLCallback(AGLCallback):
    """AGLCallback (same penalty, once per optimizer step) whose per-step metrics feed the trainer's metric store.

    The trainer's `log()` then averages them over the logging window like its own metrics, before
    `Trainer.log` appends the log to `state.log_history` and hands it to every `report_to` integration.
    Until a sink is set it behaves exactly like AGLCallback (its own window, merged in `on_log`).
    """

    def __init__(self, config: Any = None, mask: Any = None) -> None:
        super().__init__(config, mask)
        self.sink: Optional[Sink] = None

    def add_penalty_grad(self, step: int, optimizer: Any = None) -> dict[str, float]:
        metrics = super().add_penalty_grad(step, optimizer)
        if self.sink is not None:
            self.sink(metrics)
            self.window.reset()  # the trainer's store averages them; the callback's own window stays empty
        return metrics


class AxolotlTrainerAdapter:
    """AGL on one Axolotl trainer instance: its AxolotlAGLCallback, set up, with metrics routed to the trainer.

    Reuses an AxolotlAGLCallback already on the trainer (AGLPlugin adds one through
    `add_callbacks_post_trainer`), else adds one. Nothing is assigned to a class, a module or a trainer method.
    """

    plugin = "agl_axolotl"

    def __init__(self, trainer: Any, config: Optional[AGLConfig] = None, mask: Any = None) -> None:
        self.trainer = trainer
        if has_plain_callback(trainer):
            raise ValueError("The trainer carries a plain agl_hf_callback.AGLCallback: attach it with "
                             "agl_plugins.attach(trainer, config) (the Hugging Face adapter serves it), or remove it.")
        sink = metric_sink(trainer)
        if sink is None:
            raise ValueError(f"{type(trainer).__name__} has neither store_metrics() nor TRL's _metrics, so AGL metrics "
                             "could not reach its logs: add agl_hf_callback.AGLCallback(config) to its callbacks and "
                             "call agl_plugins.attach(trainer) (the Hugging Face adapter then serves it).")
        existing = _existing_callback(trainer)
        self.callback = existing if existing is not None else AxolotlAGLCallback(config, mask)
        self.callback.setup(trainer.model, trainer.args)  # start-up errors surface here
        if existing is None:
            trainer.add_callback(self.callback)
        elif config not in (None, AGLConfig()) and config != self.callback.config:
            logger.warning("AGL: the trainer already has an AGLCallback; attach() keeps its config.")
        self.callback.sink = sink

    @property
    def penalty(self) -> Any:
        """The bound agl_core.AGLPenalty."""
        return self.callback.penalty

    def detach(self) -> None:
        """Remove the callback from the trainer."""
        self.callback.sink = None
        self.trainer.remove_callback(self.callback)

    def __repr__(self) -> str:
        modules = len(self.penalty.modules) if self.penalty is not None else 0
        return (f"AxolotlTrainerAdapter({type(self.trainer).__name__}, {modules} LoRA modules, "
                f"enabled={self.callback.enabled})")


def _existing_callback(trainer: Any) -> Optional[AxolotlAGLCallback]:
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, AGLCallback)]
    if len(found) > 1:
        raise ValueError(f"The trainer has {len(found)} AGLCallback instances; keep one (the penalty would be "
                         "added once per callback).")
    return found[0] if found else None  # an AxolotlAGLCallback: plain ones are refused before


def has_plain_callback(trainer: Any) -> bool:
    """True when the trainer carries a plain AGLCallback (added by the user): the HF adapter serves it."""
    return any(isinstance(cb, AGLCallback) and not isinstance(cb, AxolotlAGLCallback)
               for cb in trainer.callback_handler.callbacks)
