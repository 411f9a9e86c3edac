"""The Axolotl adapter outside Axolotl: plugin registration, the metric sink, and what it leaves to the other adapters."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import axokit
from agl_axolotl.adapter import AxolotlAGLCallback, AxolotlTrainerAdapter, metric_sink
from agl_axolotl.plugin import agl_adapter_for_trainer, is_axolotl_trainer
from agl_core import AGLPenalty
from agl_plugins import attach, get_plugin_manager

MASK = axokit.make_mask()
CONFIG = axokit.agl_config(warmup_steps=2)


def hf_trainer(out, callbacks=(), **kw):
    from transformers import Trainer, TrainingArguments

    return Trainer(model=axokit.lora_model(), args=TrainingArguments(**axokit.common_args(out, **kw)),
                   train_dataset=axokit.token_rows(), callbacks=list(callbacks))


def test_the_entry_point_module_imports_neither_axolotl_nor_transformers():
    code = ("import sys, agl_axolotl, agl_axolotl.plugin\nfrom agl_plugins import get_plugin_manager\n"
            "pm = get_plugin_manager()\nnames = [i.plugin_name for i in pm.hook.agl_adapter_for_trainer.get_hookimpls()]\n"
            "print(sorted(names), [m for m in ('axolotl', 'transformers', 'pydantic') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'agl_axolotl'" in out and out.strip().endswith("[]"), out


def test_plain_trainers_are_left_to_the_hugging_face_adapter(tmp_path):
    trainer = hf_trainer(tmp_path)
    assert not is_axolotl_trainer(trainer) and agl_adapter_for_trainer(trainer=trainer, config=CONFIG) is None
    adapter = attach(trainer, dataclasses.replace(CONFIG, mask_path=MASK.save(tmp_path / "mask")))
    assert adapter.plugin == "agl_hf_callback"
    impl = next(i for i in get_plugin_manager().hook.agl_adapter_for_trainer.get_hookimpls()
                if i.plugin_name == "agl_axolotl")
    assert impl.tryfirst  # ahead of the TRL and HF adapters, whose trainer classes Axolotl's subclass
    other = hf_trainer(tmp_path / "other")
    before = list(other.callback_handler.callbacks)
    with pytest.raises(ValueError, match="neither store_metrics\\(\\) nor TRL's _metrics"):
        AxolotlTrainerAdapter(other, CONFIG)  # no metric store: refused before anything is added
    assert other.callback_handler.callbacks == before


def test_the_callback_hands_each_steps_metrics_to_the_sink_and_keeps_no_window(tmp_path):
    callback = AxolotlAGLCallback(CONFIG, MASK)
    trainer = hf_trainer(tmp_path, [callback], learning_rate=0.0)  # lr 0: every step sees the same weights
    assert metric_sink(trainer) is None  # a plain Trainer has no metric store (the HF adapter wraps log instead)
    received: list[dict] = []
    callback.sink = received.append
    trainer.train()
    direct = AGLPenalty(trainer.model, MASK, CONFIG)
    assert [m["agl/penalty"] for m in received] == pytest.approx([direct(s).metrics()["agl/penalty"] for s in range(3)],
                                                                 rel=1e-6)
    assert [m["agl/lambda_scale"] for m in received] == [0.5, 1.0, 1.0]
    assert callback.window.count == 0
    assert not any("agl/penalty" in h for h in trainer.state.log_history)  # not logged twice by the callback


def test_without_a_sink_it_is_a_plain_agl_callback(tmp_path):
    callback = AxolotlAGLCallback(CONFIG, MASK)
    trainer = hf_trainer(tmp_path, [callback], logging_steps=3)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "agl/penalty" in h]
    assert len(logged) == 1 and logged[0]["agl/lambda_scale"] == pytest.approx((0.5 + 1 + 1) / 3)


def test_trl_dpo_metrics_sink_with_this_trl(tmp_path):
    """TRL's `_metrics` store (used for Axolotl's DPO trainer) with the main venv's newer TRL, averaged per window."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    import tiny

    args = DPOConfig(**axokit.common_args(tmp_path, logging_steps=2, max_steps=4), bf16=False,
                     gradient_checkpointing=False)
    trainer = DPOTrainer(model=axokit.lora_model(), args=args, train_dataset=Dataset.from_list(axokit.preference_rows()),
                         processing_class=tiny.tiny_tokenizer())
    adapter = AxolotlTrainerAdapter(trainer, dataclasses.replace(CONFIG, mask_path=MASK.save(tmp_path / "mask")))
    assert adapter.callback.sink is not None
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["agl/lambda_scale"] for h in logged] == [pytest.approx(0.75), 1.0]  # mean over each 2-step window
    assert all(h["agl/penalty"] > 0 and "rewards/margins" in h for h in logged)
