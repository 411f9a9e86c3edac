"""AGLCallback: the AGL (reconstructed) penalty in a transformers Trainer, added to the gradients once per step."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any, Iterator, Optional

import torch
from agl_core import AGLConfig, AGLPenalty, FisherMask, find_lora_targets
from agl_plugins.forgetting.recorder import ForgettingOptions, ForgettingRecorder
from transformers import TrainerCallback

from .checks import as_config, load_mask, mask_source, refuse_engine
from .state import STATE_FILE, MetricWindow, checkpoint_dir, find_state, save_state

logger = logging.getLogger(__name__)

METRIC_KEYS = ("agl/penalty", "agl/L_A", "agl/L_T", "agl/E_rie", "agl/E_geo", "agl/protected_share",
               "agl/lambda_scale")


def is_training_log(logs: Any) -> bool:
    """True for the Trainer's periodic training logs (they carry `loss`), False for eval and summary logs."""
    return isinstance(logs, dict) and "loss" in logs and not any(str(k).startswith("eval_") for k in logs)


def grad_scale(optimizer: Any) -> float:
    """The AMP loss scale the task gradients carry (accelerate's AcceleratedOptimizer.scaler), else 1."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return 1.0
    return float(scaler.get_scale())


class AGLCallback(TrainerCallback):
    """Adds ∇R(θ) of the AGL penalty to the LoRA gradients at `on_step_begin`, once per optimizer step.

    The task micro-batches then accumulate onto it, so at the optimizer step the gradient is ∇L_task + ∇R:
    clipping sees the total, DDP averages (∇R + g_rank) over ranks = ∇R + mean g (∇R is the same on every
    rank), and gradient accumulation counts R once. Metrics are averaged over each logging window.

    config: an AGLConfig, a dict of its options, or None (the mask's own config). mask: a FisherMask, or the
    path of one (default `config.mask_path`). Start-up problems raise ValueError at trainer construction
    (when passed in `callbacks=`) or at `on_train_begin`, never mid-training.

    With `config.forgetting_data` set it also measures the alignment loss at log-spaced optimizer steps (see
    agl_plugins.forgetting): into the training log of that step and <output_dir>/agl_forgetting.jsonl. With
    `enabled=False` and no mask it only measures (a plain LoRA baseline). tokenizer: for the probe, when the
    Trainer has no `processing_class`.
    """

    def __init__(self, config: Any = None, mask: Any = None, *, tokenizer: Any = None) -> None:
        self._config_arg: Optional[AGLConfig] = as_config(config)
        measure_only = mask is None and self._config_arg is not None and not self._config_arg.enabled and \
            self._config_arg.mask_path is None and self._config_arg.forgetting_data is not None
        self._mask_source = None if measure_only else mask_source(mask, self._config_arg)
        self.tokenizer = tokenizer
        options = ForgettingOptions.from_config(self._config_arg)
        self.forgetting: Optional[ForgettingRecorder] = ForgettingRecorder(options) if options else None
        self.forget_metrics: dict[str, float] = {}
        self.config: Optional[AGLConfig] = self._config_arg  # resolved at setup when None
        self.mask: Optional[FisherMask] = None
        self.penalty: Optional[AGLPenalty] = None
        self.window = MetricWindow()
        self.last_metrics: dict[str, float] = {}
        self.mask_identity: Optional[str] = None
        self._model: Optional[torch.nn.Module] = None
        self._params: list[torch.Tensor] = []
        self._paused = False

    @property
    def lora_parameters(self) -> list[torch.Tensor]:
        """The trainable LoRA factors (A, B of every penalised module) that receive ∇R; empty before set-up."""
        return list(self._params)

    # ----- switching -----

    @property
    def enabled(self) -> bool:
        """Whether the penalty is added at the next step: `config.enabled` and not paused with disable()."""
        return not self._paused and (self.config is None or self.config.enabled)

    def enable(self) -> None:
        """Add the penalty again from the next optimizer step on (undoes disable())."""
        self._paused = False

    def disable(self) -> None:
        """Stop adding the penalty (and recording its metrics) from the next optimizer step on."""
        self._paused = True

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """`with callback.paused(): trainer.train()` trains without the penalty, then restores the switch."""
        before = self._paused
        self._paused = True
        try:
            yield
        finally:
            self._paused = before

    # ----- set-up -----

    def setup(self, model: Any, args: Any) -> None:
        """Check the engine, load the mask, check it against `model` and bind the penalty (once per model)."""
        refuse_engine(args)
        if model is None:
            raise ValueError("AGLCallback received no model from the Trainer; pass model= to the Trainer.")
        if model is self._model:
            return
        try:
            self._bind(model)
        except ValueError as err:
            raise ValueError(f"AGLCallback could not start: {err}") from None
        refuse_engine(args, self._params)

    def _bind(self, model: torch.nn.Module) -> None:
        if self._mask_source is None:  # measuring only (enabled=False, forgetting_data): no penalty to bind
            self._model = model
            return
        if self.mask is None:
            self.mask = load_mask(self._mask_source)
            self.config = self._config_arg if self._config_arg is not None else self.mask.config
            self.mask_identity = self.mask.identity()
            options = ForgettingOptions.from_config(self.config) if self.forgetting is None else None
            self.forgetting = ForgettingRecorder(options) if options else self.forgetting
        self.penalty = AGLPenalty(model, self.mask, self.config)  # also checks the mask's base-model fingerprint
        targets = find_lora_targets(model, self.config.adapters, self.config.target_modules)
        unique = {id(t): t for tgt in targets for t in (tgt.A, tgt.B) if t.requires_grad}
        self._params = list(unique.values())
        self._model = model
        logger.info("AGL: penalising %d LoRA module(s), |S| = %d", len(self.penalty.modules),
                    self.penalty.num_protected)

    # ----- trainer events -----

    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self.setup(model, args)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.setup(model, args)
        self.window.reset()
        self.last_metrics = {}
        if state.global_step > 0 and self.mask is not None:  # (measuring only: no penalty state to restore)
            self._restore(args, state.global_step)
        self.forget_metrics = {}
        if self.forgetting is not None:
            metrics = self.forgetting.start(
                model, self.tokenizer or kwargs.get("processing_class"), output_dir=args.output_dir,
                max_steps=state.max_steps, global_step=state.global_step, is_main=state.is_world_process_zero,
                agl_enabled=self.enabled, batch_size=args.per_device_eval_batch_size)
            if metrics:  # step 0 has no training log: a log_history entry of its own
                state.log_history.append({"epoch": 0.0, "step": 0, **metrics})

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.penalty is None or model is not self._model:
            self.setup(model, args)
        if self.enabled:
            self.add_penalty_grad(state.global_step, optimizer)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.forgetting is not None and self.forgetting.due(state.global_step):
            control.should_log = True  # on every rank (logging gathers the loss), so this step gets a training log
            self.forget_metrics.update(self.forgetting.record(
                model, state.global_step, epoch=state.epoch, tokens_seen=state.num_input_tokens_seen))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not is_training_log(logs) or "agl/penalty" in logs:
            return  # eval / summary logs, or already merged by the attach() log wrapper
        merged = self.merge_metrics(logs)
        history = state.log_history[-1] if state.log_history else None
        if merged and isinstance(history, dict) and history.get("loss") == logs.get("loss"):
            history.update(merged)  # log_history got its copy of `logs` before on_log

    def on_save(self, args, state, control, **kwargs):
        if not getattr(args, "should_save", True) or self.mask is None:
            return
        folder = checkpoint_dir(args, state.global_step)
        if not os.path.isdir(folder):
            warnings.warn(f"AGL: checkpoint folder {folder!r} not found; its AGL state was not saved.", stacklevel=2)
            return
        save_state(folder, self.state_dict(state.global_step))

    # ----- penalty, metrics, state -----

    def add_penalty_grad(self, step: int, optimizer: Any = None) -> dict[str, float]:
        """p.grad += ∇R(θ) · loss-scale for every LoRA factor, R at warm-up step `step`; returns the metrics."""
        device_type = self._params[0].device.type if self._params else "cpu"
        with torch.enable_grad(), torch.autocast(device_type, enabled=False):
            result = self.penalty(step)
            grads = [None] * len(self._params)
            if result.total.requires_grad:
                grads = torch.autograd.grad(result.total, self._params, allow_unused=True)
        scale = grad_scale(optimizer)
        with torch.no_grad():
            for p, g in zip(self._params, grads):
                if g is None:
                    continue
                g = (g * scale if scale != 1.0 else g).to(p.dtype)
                if p.grad is None:
                    p.grad = torch.empty_like(p).copy_(g)  # p's own layout (what DDP's buckets expect)
                else:
                    p.grad.add_(g)
        self.last_metrics = result.metrics()
        self.window.add(self.last_metrics)
        return self.last_metrics

    def merge_metrics(self, logs: dict) -> dict[str, float]:
        """Add the window's averages and pending agl/forget_* metrics to a training log (nothing for other logs),
        then reset both."""
        if not is_training_log(logs) or not (self.window.count or self.forget_metrics):
            return {}
        merged = {**self.window.means(), **self.forget_metrics}
        logs.update(merged)
        self.window.reset()
        self.forget_metrics = {}
        return merged

    def state_dict(self, global_step: int) -> dict[str, Any]:
        """What a checkpoint keeps: warm-up position, metric window, mask identity and config."""
        source = self._mask_source
        return {
            "global_step": global_step,
            "lambda_scale_next": self.config.lambda_scale(global_step),
            "warmup_steps": self.config.warmup_steps,
            "mask_identity": self.mask_identity,
            "mask_path": os.fspath(source) if isinstance(source, (str, os.PathLike)) else None,
            "config": self.config.to_dict(),
            "window": self.window.state_dict(),
        }

    def _restore(self, args: Any, step: int) -> None:
        found = find_state(args, step)
        if found is None:
            warnings.warn(
                f"AGL: resuming at step {step}, but no {STATE_FILE} of that step was found in "
                f"{checkpoint_dir(args, step)!r} (nor in args.resume_from_checkpoint): the AGL metric window "
                "restarts empty and the mask cannot be checked against the checkpoint's. If the checkpoint lies "
                "outside output_dir, also set TrainingArguments.resume_from_checkpoint to its folder.",
                stacklevel=2,
            )
            return
        path, saved = found
        if saved.get("mask_identity") != self.mask_identity:
            now = self.state_dict(step)["mask_path"] or "a FisherMask object"
            raise ValueError(
                f"AGLCallback could not resume: the checkpoint ({path}) was trained with AGL mask "
                f"{saved.get('mask_identity')} ({saved.get('mask_path') or 'a FisherMask object'}), but this run "
                f"has mask {self.mask_identity} ({now}). Resume with the same mask, or start a new run (a new "
                "output_dir) to train against a different mask."
            )
        self.window.load_state_dict(saved.get("window"))
        changed = sorted(k for k, v in self.config.to_dict().items() if saved.get("config", {}).get(k, v) != v)
        if changed:
            logger.warning("AGL: resuming with changed config fields %s (checkpoint %s).", changed, path)
