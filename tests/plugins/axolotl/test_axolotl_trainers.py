"""The adapter and AGLPlugin on Axolotl's real trainers, in process (runs under .venv-axolotl: `make test` does that)."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch

pytest.importorskip("axolotl", reason="Axolotl lives in .venv-axolotl; `make test` runs this file there")

import axokit  # noqa: E402
import tiny  # noqa: E402
from agl_axolotl.adapter import AxolotlTrainerAdapter  # noqa: E402
from agl_core import AGLPenalty  # noqa: E402
from agl_plugins import attach  # noqa: E402

MASK = axokit.make_mask()
CONFIG = axokit.agl_config(warmup_steps=3)
NDIGITS = 5  # Axolotl's store_metrics values are rounded to AXOLOTL_METRIC_NDIGITS decimals (default 5) when logged


def sft_trainer(out, **kw):
    from axolotl.core.trainers.base import AxolotlTrainer
    from axolotl.core.training_args import AxolotlTrainingArguments
    from datasets import Dataset

    return AxolotlTrainer(model=axokit.lora_model(), args=AxolotlTrainingArguments(**axokit.common_args(out, **kw)),
                          train_dataset=Dataset.from_list(axokit.token_rows()), processing_class=tiny.tiny_tokenizer())


def dpo_trainer(out, **kw):
    from axolotl.core.trainers.dpo.args import AxolotlDPOConfig
    from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
    from datasets import Dataset

    args = AxolotlDPOConfig(**axokit.common_args(out, **kw), bf16=False, gradient_checkpointing=False)
    return AxolotlDPOTrainer(model=axokit.lora_model(), args=args, processing_class=tiny.tiny_tokenizer(),
                             train_dataset=Dataset.from_list(axokit.preference_rows()))


BUILDERS = {"sft": sft_trainer, "dpo": dpo_trainer}


def direct_recorder(penalty_params, records):
    """A callback after the adapter's: p.grad at on_step_begin (after zero_grad: exactly ∇R) vs a direct call."""
    from transformers import TrainerCallback

    class Direct(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            direct = AGLPenalty(model, MASK, CONFIG)(state.global_step)
            params = penalty_params()
            grads = torch.autograd.grad(direct.total, params)
            records.append((direct.metrics(), [p.grad.clone() for p in params], list(grads)))

    return Direct()


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_penalty_equals_a_direct_core_call_and_metrics_reach_log_history(tmp_path, kind):
    trainer = BUILDERS[kind](tmp_path)
    adapter = attach(trainer, dataclasses.replace(CONFIG, mask_path=MASK.save(tmp_path / "mask")))
    assert isinstance(adapter, AxolotlTrainerAdapter) and adapter.plugin == "agl_axolotl"
    records: list = []
    trainer.add_callback(direct_recorder(lambda: adapter.callback.lora_parameters, records))
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(records) == len(logged) == 3
    for step, (metrics, added, direct) in enumerate(records):
        for a, d in zip(added, direct):
            torch.testing.assert_close(a, d, rtol=0, atol=0)
        expect = round(metrics["agl/penalty"], NDIGITS) if kind == "sft" else metrics["agl/penalty"]
        assert logged[step]["agl/penalty"] == pytest.approx(expect, rel=1e-6, abs=1e-12)
        assert logged[step]["agl/lambda_scale"] == pytest.approx(CONFIG.lambda_scale(step), abs=10**-NDIGITS)
        assert metrics["agl/penalty"] > 0
    assert adapter.callback.window.count == 0  # the trainer's own store averaged them, nothing left in the callback
    assert records[0][0] != records[2][0], "the weights moved: three different points were compared"


def test_a_plain_agl_callback_keeps_the_hugging_face_adapter(tmp_path):
    from agl_hf_callback import AGLCallback

    trainer = sft_trainer(tmp_path)
    trainer.add_callback(AGLCallback(CONFIG, MASK))
    adapter = attach(trainer, CONFIG)
    assert adapter.plugin == "agl_hf_callback"
    with pytest.raises(ValueError, match="plain agl_hf_callback.AGLCallback"):
        AxolotlTrainerAdapter(trainer, CONFIG)


def test_plugin_hooks_keep_base_plugin_signatures():
    from axolotl.integrations.base import BasePlugin

    from agl_axolotl import AGLArgs, AGLPlugin

    plugin = AGLPlugin()
    overridden = [name for name, fn in vars(AGLPlugin).items() if callable(fn) and hasattr(BasePlugin, name)]
    assert {"get_input_args", "add_callbacks_post_trainer", "post_trainer_create"} <= set(overridden)
    assert "get_trainer_cls" not in overridden
    for name in overridden:
        ours, base = inspect.signature(getattr(AGLPlugin, name)), inspect.signature(getattr(BasePlugin, name))
        assert list(ours.parameters) == list(base.parameters), name
    module, cls = plugin.get_input_args().rsplit(".", 1)
    assert getattr(__import__(module, fromlist=[cls]), cls) is AGLArgs


def axolotl_cfg(tmp_path, model_dir, **agl):
    from axolotl.utils.dict import DictDefault

    return DictDefault({
        "base_model": str(model_dir), "adapter": "lora", "lora_r": 4, "lora_alpha": 8,
        "lora_target_modules": list(axokit.TARGETS), "plugins": ["agl_axolotl.AGLPlugin"],
        "datasets": [{"path": str(tmp_path / "sft.jsonl"), "type": "chat_template"}], "micro_batch_size": 2,
        "gradient_accumulation_steps": 1, "sequence_len": 64, "learning_rate": 0.01, "num_epochs": 1,
        "output_dir": str(tmp_path / "out"), "agl": agl,
    })


def test_axolotl_config_validation_names_the_agl_field(tmp_path):
    from axolotl.utils.config import prepare_plugins, validate_config

    model_dir = tmp_path / "model"
    tiny.tiny_llama(0).save_pretrained(model_dir)
    tiny.tiny_tokenizer().save_pretrained(model_dir)
    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    good = axolotl_cfg(tmp_path, model_dir, lambda_a=3.0, k_out="all")
    prepare_plugins(good)
    validated = validate_config(good)
    assert dict(validated["agl"])["lambda_a"] == 3.0 and dict(validated["agl"])["k_out"] == "all"
    for field, value, words in (("rho", 2.0, "AGLConfig.rho=2.0 is invalid"), ("alpha", -1, "AGLConfig.alpha=-1"),
                                ("alignment_dataset", "nope.jsonl", "no such file")):
        with pytest.raises(Exception) as info:
            validate_config(axolotl_cfg(tmp_path, model_dir, **{field: value}))
        assert f"agl.{field}" in str(info.value) and words in str(info.value)


def test_agl_plugin_hooks_on_a_real_trainer_estimate_the_mask_and_train(tmp_path):
    from axolotl.utils.dict import DictDefault

    from agl_axolotl import AGLPlugin

    data = tmp_path / "align.jsonl"
    data.write_text(json.dumps({"prompt": "Help me steal a car.", "label": "unsafe"}) + "\n"
                    + json.dumps({"prompt": "Name a colour.", "label": "safe"}) + "\n")
    trainer = sft_trainer(tmp_path / "out")
    cfg = DictDefault({"output_dir": str(tmp_path / "out"), "base_model": "tiny",
                       "agl": {"alignment_dataset": str(data), "max_new_tokens": 4, "rho": 0.05, "lambda_a": 2.0}})
    plugin = AGLPlugin()
    for callback in plugin.add_callbacks_post_trainer(cfg, trainer):  # what Axolotl's trainer builder does
        trainer.add_callback(callback)
    plugin.post_trainer_create(cfg, trainer)
    assert (tmp_path / "out" / "agl_mask" / "mask.safetensors").is_file()
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(h["agl/penalty"] > 0 for h in logged)
    disabled = DictDefault(dict(cfg, agl={"enabled": False}))
    assert AGLPlugin().add_callbacks_post_trainer(disabled, sft_trainer(tmp_path / "off")) == []


def test_the_readme_yaml_validates_with_axolotl(tmp_path):
    """The README's Axolotl example, with its model and data paths pointed at tiny local files, passes validation."""
    import re
    from pathlib import Path

    import yaml
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("\n## Axolotl\n"):]
    cfg = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    assert cfg["plugins"] == ["agl_axolotl.AGLPlugin"] and "mask_path" not in cfg["agl"]
    model_dir = tmp_path / "model"
    tiny.tiny_llama(0).save_pretrained(model_dir)
    tiny.tiny_tokenizer().save_pretrained(model_dir)
    (tmp_path / "sft.jsonl").write_text(json.dumps({"messages": []}) + "\n")
    cfg.update(base_model=str(model_dir), output_dir=str(tmp_path / "out"))
    cfg["datasets"][0]["path"] = str(tmp_path / "sft.jsonl")
    cfg = DictDefault(cfg)
    prepare_plugins(cfg)
    agl = dict(validate_config(cfg)["agl"])
    assert agl["alignment_dataset"] == "builtin:alignment-v1" and agl["lambda_a"] == 1.0 and agl["warmup_steps"] == 20
