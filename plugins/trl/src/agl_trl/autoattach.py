"""Attach AGL to a trainer built inside code we do not control (TRL's script `main`), at its first training forward."""

from __future__ import annotations

import inspect
import sys
from typing import Any, Optional

import torch
from torch.nn.modules.module import register_module_forward_pre_hook


class AGLStartError(ValueError):
    """AGL could not start: a bad `--agl_*` option or mask, or attaching to the trainer failed (message says why)."""


def training_trainer() -> Optional[Any]:
    """The `transformers.Trainer` whose `training_step` is on the current call stack, or None."""
    if "transformers" not in sys.modules:
        return None
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "training_step":
                candidate = frame.f_locals.get("self")
                if isinstance(candidate, Trainer):
                    return candidate
            frame = frame.f_back
        return None
    finally:
        del frame  # break the frame reference cycle


def catch_up(adapter: Any) -> None:
    """Run what an adapter attached mid-step missed: `on_train_begin` (set-up, resume state) and this step's
    `on_step_begin` (∇R into p.grad), with the arguments the trainer's callback handler passes."""
    trainer = adapter.trainer
    handler = trainer.callback_handler
    adapter.callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=handler.model)
    adapter.callback.on_step_begin(trainer.args, trainer.state, trainer.control, model=handler.model,
                                   optimizer=handler.optimizer)


class AutoAttach:
    """A global module forward-pre-hook (public PyTorch API) that, at the first forward run from a Trainer's
    `training_step` with gradients on, attaches AGL with `agl_plugins.attach(trainer, config)`, adds ∇R for the
    current (first) step and removes itself. Use as a context manager around the code that builds and trains.
    """

    def __init__(self, config: Any) -> None:
        self.config = config
        self.adapter: Optional[Any] = None
        self.forwards_seen = 0
        self._handle: Optional[Any] = None
        self._busy = False

    def install(self) -> "AutoAttach":
        if self._handle is None and self.adapter is None:
            self._handle = register_module_forward_pre_hook(self._hook)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @property
    def installed(self) -> bool:
        return self._handle is not None

    def __enter__(self) -> "AutoAttach":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def _hook(self, module: torch.nn.Module, args: Any) -> None:
        self.forwards_seen += 1
        if self._busy or not torch.is_grad_enabled():  # eval, generation, DPO's reference pass: keep waiting
            return None
        trainer = training_trainer()
        if trainer is None:
            return None
        self._busy = True
        try:
            self.remove()
            self.adapter = self._attach(trainer)
        finally:
            self._busy = False
        return None

    def _attach(self, trainer: Any) -> Any:
        from agl_plugins import attach

        try:
            adapter = attach(trainer, self.config)
            catch_up(adapter)
        except ValueError as err:
            raise AGLStartError(f"AGL could not attach to {type(trainer).__name__}: {err}") from None
        return adapter
