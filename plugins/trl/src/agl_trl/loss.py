"""The AGL loss hook for TRL trainers: R(θ) added inside `compute_loss`, counted once per optimizer step."""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from agl_core import AGLConfig, AGLPenalty, FisherMask
from agl_hf_callback import AGLCallback
from agl_hf_callback.checks import as_config, load_mask, mask_source, refuse_engine

logger = logging.getLogger(__name__)


def trainer_reads_scaled_flag() -> bool:
    """Whether the installed `transformers.Trainer` honours `loss_is_scaled_for_ga` (transformers ≥ 5.19)."""
    from transformers import Trainer

    return "loss_is_scaled_for_ga" in vars(Trainer)


def loss_is_scaled_for_ga(trainer: Any, num_items_in_batch: Any) -> bool:
    """True when `trainer.training_step` uses `compute_loss`'s result as already scaled for gradient accumulation.

    Mirrors `Trainer.training_step`: the declared `loss_is_scaled_for_ga` where transformers reads it, else
    `(model_accepts_loss_kwargs and num_items_in_batch is not None) or compute_loss_func is not None`. When False,
    the trainer divides the loss by `current_gradient_accumulation_steps` itself.
    """
    declared = getattr(trainer, "loss_is_scaled_for_ga", None)
    if declared is not None and trainer_reads_scaled_flag():
        return bool(declared)
    accepts = bool(getattr(trainer, "model_accepts_loss_kwargs", False))
    return (accepts and num_items_in_batch is not None) or getattr(trainer, "compute_loss_func", None) is not None


def accumulation_divisor(trainer: Any, num_items_in_batch: Any) -> int:
    """What to divide R by when adding it to each micro-batch loss so that it counts once per optimizer step."""
    if not loss_is_scaled_for_ga(trainer, num_items_in_batch):
        return 1  # training_step divides the whole loss (R included) by the accumulation steps
    steps = getattr(trainer, "current_gradient_accumulation_steps", None)
    return int(steps or trainer.args.gradient_accumulation_steps)


class AGLLossTerm:
    """R(θ) for adding to a trainer's `compute_loss` result, with the trainer's accumulation rule applied.

    Inside your own `compute_loss`: `loss = loss + self.agl_term(self, num_items_in_batch)` with
    `self.agl_term = AGLLossTerm(config)` (bound at the first call, or with `setup(trainer)`). Returns 0.0
    outside training (eval, no_grad) and while disabled. The per-step metrics go into TRL's own metrics
    (`trainer._metrics["train"]`), which TRL averages over each logging window.
    """

    def __init__(self, config: Any = None, mask: Any = None) -> None:
        self._config_arg: Optional[AGLConfig] = as_config(config)
        self._mask_source = mask_source(mask, self._config_arg)
        self.config: Optional[AGLConfig] = self._config_arg
        self.mask: Optional[FisherMask] = None
        self.penalty: Optional[AGLPenalty] = None
        self.last_metrics: dict[str, float] = {}
        self._model: Optional[torch.nn.Module] = None
        self._recorded_step: Optional[int] = None
        self._paused = False
        self._device_type = "cpu"

    @property
    def enabled(self) -> bool:
        return not self._paused and (self.config is None or self.config.enabled)

    def enable(self) -> None:
        self._paused = False

    def disable(self) -> None:
        self._paused = True

    def setup(self, trainer: Any) -> None:
        """Refuse DeepSpeed/FSDP and a second AGL route, load the mask, check it and bind the penalty."""
        refuse_engine(trainer.args)
        if any(isinstance(cb, AGLCallback) for cb in trainer.callback_handler.callbacks):
            raise ValueError("The trainer has both the AGL loss hook and an AGLCallback: the penalty would be added "
                             "twice. Use one of them (remove AGLCallback from callbacks=, or the loss hook).")
        model = trainer.model
        if model is self._model:
            return
        try:
            if self.mask is None:
                self.mask = load_mask(self._mask_source)
                self.config = self._config_arg if self._config_arg is not None else self.mask.config
            self.mask.check_model(model)
            self.penalty = AGLPenalty(model, self.mask, self.config)
            self._device_type = next(model.parameters()).device.type
        except ValueError as err:
            raise ValueError(f"The AGL loss hook could not start: {err}") from None
        self._model = model

    def __call__(self, trainer: Any, num_items_in_batch: Any = None) -> Any:
        """R / divisor as a 0-dim tensor during training (0.0 otherwise); records metrics once per step."""
        if not (self.enabled and trainer.model.training and torch.is_grad_enabled()):
            return 0.0
        if self.penalty is None or trainer.model is not self._model:
            self.setup(trainer)
        step = trainer.state.global_step
        with torch.autocast(self._device_type, enabled=False):  # R in float32 even under bf16 autocast
            result = self.penalty(step)
        if step != self._recorded_step:
            self._recorded_step = step
            self.last_metrics = result.metrics()
            record_metrics(trainer, self.last_metrics)
        return result.total / accumulation_divisor(trainer, num_items_in_batch)


def record_metrics(trainer: Any, metrics: dict[str, float]) -> None:
    """Append one step's AGL metrics to TRL's `trainer._metrics["train"]` (averaged by TRL's `log`)."""
    store = getattr(trainer, "_metrics", None)
    if not isinstance(store, dict) or "train" not in store:
        return  # not a TRL trainer: the metrics stay on the term / callback (`last_metrics`)
    for key, value in metrics.items():
        store["train"][key].append(float(value))


class AGLLossMixin:
    """Adds the AGL penalty inside `compute_loss`: `class MySFT(AGLLossMixin, SFTTrainer)`, likewise for DPO.

    `MySFT(..., agl_config=AGLConfig(mask_path="mask/"), agl_mask=None)` takes the trainer's own arguments
    plus these two. The penalty is divided by the accumulation steps exactly when the trainer treats the loss
    as already scaled for accumulation (`loss_is_scaled_for_ga`), so ∇ = ∇L_task + ∇R once per optimizer step.
    The logged `loss` includes R; `agl/*` metrics go into TRL's logs.
    """

    def __init__(self, *args: Any, agl_config: Any = None, agl_mask: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.agl_term = AGLLossTerm(agl_config, agl_mask)
        self.agl_term.setup(self)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        extra = self.agl_term(self, num_items_in_batch)
        if return_outputs:
            loss, outputs = result
            return loss + extra, outputs
        return result + extra
