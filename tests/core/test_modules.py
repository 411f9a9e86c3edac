"""LoRA discovery and base-linear discovery on real PEFT models."""

import math

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model

import tiny
from agl_core import find_linear_modules, find_lora_targets
from agl_core.modules import base_name, logical_weight, name_matches


def test_lora_targets_have_base_names_shapes_and_scale():
    model = tiny.tiny_lora(r=4, targets=("q_proj", "v_proj", "down_proj"))
    targets = find_lora_targets(model)
    names = sorted(t.name for t in targets)
    assert names[0] == "model.layers.0.mlp.down_proj" and len(names) == 6
    down = next(t for t in targets if t.name.endswith("down_proj"))
    assert down.shape == (64, 128) and down.A.shape == (4, 128) and down.B.shape == (64, 4)
    assert all(t.scale == 2.0 and t.adapter == "default" for t in targets)
    base = dict(model.named_modules())["base_model.model.model.layers.0.mlp.down_proj"].base_layer
    assert down.base_layer is base


def test_rslora_scale():
    model = tiny.tiny_lora(r=4, use_rslora=True)
    assert all(math.isclose(t.scale, 8 / math.sqrt(4)) for t in find_lora_targets(model))


def test_frozen_inactive_ref_adapter_is_skipped_and_filters_apply():
    model = tiny.tiny_lora(r=4)
    model.add_adapter("ref", LoraConfig(r=2, target_modules=["q_proj"]))
    for name, p in model.named_parameters():
        if ".ref." in name:
            p.requires_grad_(False)
    targets = find_lora_targets(model)
    assert {t.adapter for t in targets} == {"default"}
    assert {t.name.split(".")[-1] for t in find_lora_targets(model, target_modules=["q_proj"])} == {"q_proj"}
    assert find_lora_targets(model, adapters=["other"]) == []


def test_two_active_trainable_adapters_are_both_found():
    model = tiny.tiny_lora(r=4, targets=("q_proj",))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    found = {(t.name, t.adapter) for t in find_lora_targets(model)}
    assert ("model.layers.0.self_attn.q_proj", "second") in found and len(found) == 4


def test_dora_is_refused_with_a_clear_message():
    model = tiny.tiny_lora(r=4, use_dora=True)
    with pytest.raises(ValueError, match="DoRA adapter. AGL supports plain LoRA only"):
        find_lora_targets(model)


def test_lora_on_embedding_is_refused():
    model = tiny.tiny_lora(r=4, targets=("q_proj", "embed_tokens"))
    with pytest.raises(ValueError, match="non-linear layer"):
        find_lora_targets(model)


def test_non_lora_adapter_is_refused():
    model = get_peft_model(tiny.tiny_llama(), IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="AGL supports LoRA adapters only"):
        find_lora_targets(model)


def test_linear_modules_same_on_plain_and_peft_model_and_skip_lm_head():
    plain = tiny.tiny_llama()
    wrapped = tiny.tiny_lora(tiny.tiny_llama(), targets=("q_proj", "v_proj"))
    a, b = find_linear_modules(plain), find_linear_modules(wrapped)
    assert list(a) == list(b) and len(a) == 14 and "lm_head" not in a
    assert all(type(m) is torch.nn.Linear for m in b.values())
    assert "lm_head" in find_linear_modules(plain, ["lm_head"])
    assert list(find_linear_modules(plain, ["re:.*layers\\.1\\..*_proj"]))[0] == "model.layers.1.self_attn.q_proj"


def test_conv1d_logical_weight_is_out_by_in():
    from transformers.pytorch_utils import Conv1D

    layer = Conv1D(nf=6, nx=4)  # out 6, in 4; stored (in, out)
    assert layer.weight.shape == (4, 6) and logical_weight(layer).shape == (6, 4)


def test_name_helpers():
    assert base_name("base_model.model.model.layers.0.q_proj") == "model.layers.0.q_proj"
    assert name_matches("a.b.q_proj", ["q_proj"]) and not name_matches("a.b.xq_proj", ["q_proj"])
    assert name_matches("anything", None)
