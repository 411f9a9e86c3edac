"""Bad input stops at start-up with a clear message: config, mask, LoRA set-up, engines, NaN in the penalty."""

from __future__ import annotations

import logging

import pytest
import torch

import hfkit
import tiny
from agl_core import AGLConfig, FisherMask
from agl_hf_callback import AGLCallback
from agl_plugins import attach

MASK = hfkit.make_mask()
CONFIG = hfkit.agl_config()


def build(tmp_path, callback, model=None, **kw):
    """A Trainer with the callback passed in callbacks=: set-up errors surface at construction."""
    return hfkit.trainer(model if model is not None else hfkit.lora_model(), tmp_path, [callback], **kw)


@pytest.mark.parametrize("config, message", [
    ({"rho": 2.0}, r"AGLConfig.rho=2.0 is invalid: must be a finite number in \(0.0, 1.0\]"),
    ({"lambda_a": -1}, r"AGLConfig.lambda_a=-1 is invalid"),
    ({"warmup": 3}, r"Unknown AGLConfig option\(s\) \['warmup'\]"),
    ("mask/", r"AGLCallback got config of type str; pass an agl_core.AGLConfig, a dict"),
])
def test_config_errors(config, message):
    with pytest.raises(ValueError, match=message):
        AGLCallback(config, MASK)


def test_no_mask_given():
    with pytest.raises(ValueError, match=r"needs a Fisher mask: pass mask=.*mask_path.*agl fisher --model"):
        AGLCallback(CONFIG)


def test_mask_of_wrong_type():
    with pytest.raises(ValueError, match="got mask of type dict; pass a FisherMask, or the path"):
        AGLCallback(CONFIG, mask={"q_proj": 1})


def test_missing_mask_file_names_the_create_command(tmp_path):
    callback = AGLCallback(AGLConfig(mask_path=str(tmp_path / "nowhere")))
    with pytest.raises(ValueError, match=r"AGLCallback could not start: No AGL mask at .*does not exist.*agl fisher"):
        build(tmp_path, callback)


def test_mask_of_another_base_model(tmp_path):
    other = hfkit.make_mask(seed=1)  # same shapes, other base weights
    with pytest.raises(ValueError, match="could not start: The mask was estimated on a different base model"):
        build(tmp_path, AGLCallback(CONFIG, other))


def test_mask_path_is_loaded_and_checked(tmp_path):
    path = MASK.save(tmp_path / "mask")
    callback = AGLCallback(AGLConfig(mask_path=str(tmp_path / "mask"), rho=0.05))
    build(tmp_path, callback)
    assert callback.mask == MASK and callback.mask_identity == MASK.identity() and path.endswith("mask.safetensors")


def test_lora_module_without_mask_entry(tmp_path):
    q_only = hfkit.make_mask()
    q_only.blocks = {k: v for k, v in q_only.blocks.items() if k.endswith("q_proj")}
    with pytest.raises(ValueError, match=r"2 LoRA module\(s\) have no entry in the mask: .*v_proj.*Re-estimate"):
        build(tmp_path, AGLCallback(CONFIG, q_only))


def test_mask_modules_without_lora_are_reported(tmp_path, caplog):
    callback = AGLCallback(CONFIG, MASK)
    with caplog.at_level(logging.WARNING, logger="agl_core"):
        build(tmp_path, callback)
    assert "AGL mask covers 10 module(s) with no trainable LoRA adapter" in caplog.text
    assert len(callback.penalty.modules) == 4  # q, v in 2 layers: training goes on, they are penalised


def test_model_without_lora(tmp_path):
    with pytest.raises(ValueError, match="could not start: No active, trainable LoRA adapter found.*get_peft_model"):
        build(tmp_path, AGLCallback(CONFIG, MASK), model=tiny.tiny_llama(0))


def test_frozen_lora_adapter(tmp_path):
    model = hfkit.lora_model()
    for name, p in model.named_parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="No active, trainable LoRA adapter"):
        AGLCallback(CONFIG, MASK).setup(model, hfkit.training_args(tmp_path))


def test_nan_in_the_penalty_names_the_module(tmp_path):
    model = hfkit.lora_model()
    with torch.no_grad():
        model.base_model.model.model.layers[1].self_attn.v_proj.lora_B["default"].weight[0, 0] = float("inf")
    trainer = build(tmp_path, AGLCallback(CONFIG, MASK), model=model)
    with pytest.raises(FloatingPointError, match=r"first non-finite module 'model.layers.1.self_attn.v_proj'"):
        trainer.train()


@pytest.mark.parametrize("engine, field, value", [
    ("DeepSpeed", "deepspeed", {"zero_optimization": {"stage": 3}}),
    ("FSDP", "fsdp", True),
])
def test_deepspeed_and_fsdp_are_refused_before_training(tmp_path, engine, field, value):
    trainer = build(tmp_path, AGLCallback(CONFIG, MASK))
    setattr(trainer.args, field, value)  # the engines themselves do not run on this CPU-only machine
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" in k}
    with pytest.raises(ValueError, match=f"AGL cannot yet guarantee an exact penalty under {engine}: .*Run without"):
        trainer.train()
    after = trainer.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "no step may run before the refusal"


def test_accelerate_launch_fsdp_is_refused_at_construction(tmp_path, monkeypatch):
    """`accelerate launch` with an FSDP config sets ACCELERATE_USE_FSDP for the training script."""
    from transformers import Trainer

    args = hfkit.training_args(tmp_path)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="exact penalty under FSDP"):
        Trainer(model=hfkit.lora_model(), args=args, train_dataset=hfkit.dataset(),
                callbacks=[AGLCallback(CONFIG, MASK)])


def test_accelerate_launch_deepspeed_is_refused_at_train(tmp_path, monkeypatch):
    """ACCELERATE_USE_DEEPSPEED makes TrainingArguments and Accelerator require deepspeed (not installed
    here), so it is set after construction; the callback checks again at on_train_begin."""
    trainer = build(tmp_path, AGLCallback(CONFIG, MASK))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="exact penalty under DeepSpeed: the DeepSpeed engine owns the gradients"):
        trainer.train()


def test_attach_errors(tmp_path):
    trainer = hfkit.trainer(hfkit.lora_model(), tmp_path)
    with pytest.raises(ValueError, match="needs a Fisher mask"):
        attach(trainer, CONFIG)
    with pytest.raises(ValueError, match="could not start: No AGL mask at"):
        attach(trainer, AGLConfig(mask_path=str(tmp_path / "missing")))
    assert not any(isinstance(cb, AGLCallback) for cb in trainer.callback_handler.callbacks)
    assert "log" not in vars(trainer), "a failed attach leaves the trainer untouched"
    trainer.add_callback(AGLCallback(CONFIG, MASK))
    trainer.add_callback(AGLCallback(CONFIG, MASK))
    with pytest.raises(ValueError, match="has 2 AGLCallback instances; keep one"):
        attach(trainer, CONFIG)


def test_mask_file_roundtrip_through_attach(tmp_path):
    path = FisherMask.save(MASK, tmp_path / "m.safetensors")
    trainer = hfkit.trainer(hfkit.lora_model(), tmp_path)
    adapter = attach(trainer, AGLConfig(mask_path=path, rho=0.05))
    assert adapter.penalty.modules == [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert "HFTrainerAdapter(Trainer, 4 LoRA modules, enabled=True)" == repr(adapter)
    adapter.detach()
    assert "log" not in vars(trainer) and adapter.callback not in trainer.callback_handler.callbacks
