"""The agl_trl plugin: which trainers it recognises, and the AGL metrics in TRL's own metrics (console, log_history,
TensorBoard), averaged over each logging window."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

import hfkit
import trlkit
from agl_core import AGLPenalty
from agl_hf_callback import METRIC_KEYS, AGLCallback
from agl_plugins import attach
from agl_trl import TRLMetricsSink, TRLTrainerAdapter
from agl_trl.plugin import agl_adapter_for_trainer

MASK = trlkit.MASK
CONFIG = hfkit.agl_config(warmup_steps=3)


def config(tmp_path):
    return dataclasses.replace(CONFIG, mask_path=MASK.save(tmp_path / "mask"))


def test_recognises_sft_dpo_and_subclasses_only(tmp_path):
    from trl import SFTTrainer

    class MySFT(SFTTrainer):
        pass

    sub = trlkit.sft_trainer(hfkit.lora_model(), tmp_path / "sub", cls=MySFT)
    assert isinstance(agl_adapter_for_trainer(trainer=sub, config=config(tmp_path)), TRLTrainerAdapter)
    dpo = trlkit.dpo_trainer(hfkit.lora_model(), tmp_path / "dpo")
    adapter = attach(dpo, config(tmp_path))
    assert isinstance(adapter, TRLTrainerAdapter) and adapter.plugin == "agl_trl" and adapter.trainer is dpo
    assert [n for n in adapter.penalty.modules] and all(".ref" not in n for n in adapter.penalty.modules)
    plain = hfkit.trainer(hfkit.lora_model(), tmp_path / "hf")  # a transformers.Trainer: the HF plugin's job
    assert agl_adapter_for_trainer(trainer=plain, config=config(tmp_path)) is None
    assert agl_adapter_for_trainer(trainer=object(), config=config(tmp_path)) is None


def test_plugin_import_pulls_in_neither_trl_nor_transformers():
    code = ("import sys, agl_trl.plugin as p; from agl_plugins import get_plugin_manager; get_plugin_manager(); "
            "assert p.agl_adapter_for_trainer(trainer=object(), config=None) is None; "
            "bad = [m for m in ('trl', 'transformers') if m in sys.modules]; assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def _direct_records(adapter, records):
    """A callback (after the adapter's) recording the direct agl_core metrics at every step."""
    from transformers import TrainerCallback

    class Direct(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            records.append(AGLPenalty(model, MASK, CONFIG)(state.global_step).metrics())

    return Direct()


def _event_scalars(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict = {}
    for events in folder.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


def test_metrics_go_through_trl_metrics_to_logs_and_tensorboard(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    trainer = trlkit.sft_trainer(hfkit.lora_model(), tmp_path, learning_rate=5e-2, max_steps=4, logging_steps=2,
                                 report_to=["tensorboard"], disable_tqdm=False)
    adapter = attach(trainer, config(tmp_path))
    records: list = []
    trainer.add_callback(_direct_records(adapter, records))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4] and len(records) == 4
    scalars = _event_scalars(tmp_path)
    for i, entry in enumerate(logs):  # TRL's log averages its _metrics over the window: here 2 steps
        for key in METRIC_KEYS:
            mean = (records[2 * i][key] + records[2 * i + 1][key]) / 2
            assert entry[key] == pytest.approx(mean, rel=1e-6), (key, entry["step"])
            assert dict(scalars[f"train/{key}"])[entry["step"]] == pytest.approx(mean, rel=1e-5), key
        assert "mean_token_accuracy" in entry  # TRL's own metrics still there
    assert records[0]["agl/penalty"] != records[3]["agl/penalty"], "the weights moved: windows differ"
    assert capsys.readouterr().out.count("'agl/penalty'") == 2
    assert not trainer._metrics["train"], "TRL cleared its window after the last log"
    assert adapter.callback.window.count == 0, "the sink drained the callback's window every step"


def test_attach_reuses_callback_and_sink_and_detaches(tmp_path):
    callback = AGLCallback(CONFIG, MASK)
    trainer = trlkit.sft_trainer(hfkit.lora_model(), tmp_path, [callback])
    first, second = attach(trainer, config(tmp_path)), attach(trainer, config(tmp_path))
    assert first.callback is callback and second.callback is callback and second.sink is first.sink
    assert sum(isinstance(cb, TRLMetricsSink) for cb in trainer.callback_handler.callbacks) == 1
    first.detach()
    assert not any(isinstance(cb, (AGLCallback, TRLMetricsSink)) for cb in trainer.callback_handler.callbacks)


def test_plain_callback_still_logs_in_trl(tmp_path):
    """Way 1 without attach(): the callback's own on_log reaches log_history (not the reporting integrations)."""
    trainer = trlkit.dpo_trainer(hfkit.lora_model(), tmp_path, [AGLCallback(CONFIG, MASK)], logging_steps=1)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(h["agl/penalty"] > 0 and "rewards/margins" in h for h in logs)
    assert [h["agl/lambda_scale"] for h in logs] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_start_up_errors_at_attach(tmp_path):
    trainer = trlkit.sft_trainer(hfkit.lora_model(targets=("q_proj", "k_proj")), tmp_path)
    wrong = dataclasses.replace(CONFIG, mask_path=hfkit.make_mask(seed=9).save(tmp_path / "other"))
    with pytest.raises(ValueError, match="different base model"):
        attach(trainer, wrong)
    with pytest.raises(ValueError, match="needs a Fisher mask"):
        attach(trainer, dataclasses.replace(CONFIG, mask_path=None))
    for p in trainer.model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="No active, trainable LoRA adapter"):
        attach(trainer, config(tmp_path))
