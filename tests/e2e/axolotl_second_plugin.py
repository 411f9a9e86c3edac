"""A second, passive Axolotl plugin for the AGL end-to-end test: records its hooks and the logs its callback sees."""

from __future__ import annotations

import json
import os

from axolotl.integrations.base import BasePlugin
from transformers import TrainerCallback


def _record(event: str, **data) -> None:
    path = os.environ.get("SECOND_PLUGIN_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": event, **data}) + "\n")


class LogRecorder(TrainerCallback):
    """Adds its own metric through the trainer's store each step and records the keys of every training log."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        store = getattr(self.trainer, "store_metrics", None)
        if callable(store):
            store({"second/steps_seen": float(state.global_step)}, train_eval="train")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            _record("on_log", step=state.global_step, keys=sorted(logs))


class SecondPlugin(BasePlugin):
    """Listed beside agl_axolotl.AGLPlugin; changes nothing about training."""

    def register(self, cfg):
        _record("register")

    def add_callbacks_post_trainer(self, cfg, trainer):
        _record("add_callbacks_post_trainer", trainer=type(trainer).__name__)
        return [LogRecorder(trainer)]

    def post_trainer_create(self, cfg, trainer):
        names = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
        _record("post_trainer_create", trainer=type(trainer).__name__, callbacks=names)

    def post_train(self, cfg, model):
        _record("post_train")
