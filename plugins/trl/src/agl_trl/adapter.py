"""The agl_plugins adapter for TRL's SFTTrainer / DPOTrainer: AGLCallback plus the AGL metrics in TRL's own metrics."""

from __future__ import annotations

from typing import Any, Optional

from agl_core import AGLConfig
from agl_hf_callback import AGLCallback
from agl_hf_callback.adapter import ensure_callback
from transformers import TrainerCallback



class TRLMetricsSink(TrainerCallback):
    """At each `on_step_end` (before the Trainer logs) moves the callback's step metrics into TRL's `_metrics`.

    TRL's `log` averages `trainer._metrics["train"]` over the logging window and merges it into the log before
    `Trainer.log` appends it to `log_history` and hands it to the reporting integrations.
    """

    def __init__(self, trainer: Any, callback: AGLCallback) -> None:
        self.trainer = trainer
        self.callback = callback

    def flush(self) -> None:
        """Append the window's averages (normally one step) to `_metrics["train"]` and empty the window."""
        window = self.callback.window
        if not window.count:
            return
        store = self.trainer._metrics["train"]
        for key, value in window.means().items():
            store[key].append(value)
        window.reset()

    def on_step_end(self, args, state, control, **kwargs):
        self.flush()


class TRLTrainerAdapter:
    """AGL on one TRL trainer instance: the AGLCallback (∇R added at `on_step_begin`, once per optimizer step)
    and a `TRLMetricsSink` that routes its metrics through TRL's own metric store, so they reach the console,
    `log_history` and every `report_to` integration. Nothing is assigned to a class, a module or a method.
    """

    plugin = "agl_trl"

    def __init__(self, trainer: Any, config: Optional[AGLConfig] = None, mask: Any = None) -> None:
        if not isinstance(getattr(trainer, "_metrics", None), dict) or "train" not in trainer._metrics:
            raise ValueError(f"{type(trainer).__name__} has no TRL metric store (`_metrics['train']`); attach AGL "
                             "with agl_hf_callback.HFTrainerAdapter or AGLCallback instead.")
        if getattr(trainer, "agl_term", None) is not None:
            raise ValueError(f"{type(trainer).__name__} already adds the AGL penalty in compute_loss (AGLLossMixin); "
                             "attaching AGLCallback too would add it twice. Use one of them.")
        self.trainer = trainer
        self.callback = ensure_callback(trainer, config, mask)
        sink = _find(trainer, TRLMetricsSink)
        self.sink = sink if sink is not None else TRLMetricsSink(trainer, self.callback)
        if sink is None:
            trainer.add_callback(self.sink)

    @property
    def penalty(self) -> Any:
        """The bound agl_core.AGLPenalty."""
        return self.callback.penalty

    def detach(self) -> None:
        """Remove the callback and the metrics sink from the trainer."""
        self.trainer.remove_callback(self.sink)
        self.trainer.remove_callback(self.callback)

    def __repr__(self) -> str:
        modules = len(self.penalty.modules) if self.penalty is not None else 0
        name = type(self.trainer).__name__
        return f"TRLTrainerAdapter({name}, {modules} LoRA modules, enabled={self.callback.enabled})"


def _find(trainer: Any, cls: type) -> Optional[Any]:
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, cls)]
    if len(found) > 1:
        raise ValueError(f"The trainer has {len(found)} {cls.__name__} instances; keep one (the penalty or its "
                         "metrics would be counted once per instance).")
    return found[0] if found else None
