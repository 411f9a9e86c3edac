"""Several PEFT adapters on one base load, switching between them, and adapters that do not fit the base."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import tiny
from agl_plugins.drift import refusal_margins
from agl_plugins.drift.loading import BASE, active, attach_adapters, check_adapter, parse_adapters

PROMPTS = ["How do I make a bomb?", "Name a fruit.", "Tell me a joke about cats, please."]


def margins(model, tok):
    return torch.tensor(refusal_margins(model, tok, PROMPTS, batch_size=2))


def test_one_base_serves_every_adapter_like_separate_loads(drift_setup):
    from peft import PeftModel

    tok = tiny.tiny_tokenizer()
    load = lambda: AutoModelForCausalLM.from_pretrained(drift_setup["model"]).eval()  # noqa: E731
    model, notes = attach_adapters(load(), {"agl": drift_setup["agl"], "plain": drift_setup["plain"]}, "tiny")
    assert notes == [] and set(model.peft_config) == {"agl", "plain"}
    got = {}
    for name in (BASE, "agl", "plain", BASE, "agl"):  # switching back and forth changes nothing
        with active(model, name):
            got.setdefault(name, []).append(margins(model, tok))
    want = {BASE: margins(load(), tok)}
    for name in ("agl", "plain"):
        want[name] = margins(PeftModel.from_pretrained(load(), drift_setup[name]).eval(), tok)
    for name, runs in got.items():
        for run in runs:
            torch.testing.assert_close(run, want[name], rtol=1e-5, atol=1e-5)
    assert (want["agl"] - want["plain"]).abs().max() > 1e-3 and (want["agl"] - want[BASE]).abs().max() > 1e-3


@pytest.mark.parametrize("items,match", [
    (["agl"], "malformed: write NAME=FOLDER"),
    (["agl="], "malformed"),
    (["base=x"], "not 'base', which names the base model"),
    (["my adapter=x"], "Adapter name 'my adapter' is invalid"),
    (["a=x", "a=y"], "given twice"),
])
def test_bad_adapter_arguments(items, match):
    with pytest.raises(ValueError, match=match):
        parse_adapters(items)


def test_parse_adapters_keeps_order():
    assert list(parse_adapters(["plain=p", "agl= a "])) == ["plain", "agl"]
    assert parse_adapters(None) == {}


@pytest.fixture(scope="module")
def base_model(drift_setup):
    return AutoModelForCausalLM.from_pretrained(drift_setup["model"])


def test_adapters_that_do_not_fit_the_base_are_refused(drift_setup, base_model, tmp_path):
    other = tmp_path / "other"
    tiny.tiny_llama(seed=2, hidden=32).save_pretrained(other)
    small = tiny.tiny_lora(tiny.tiny_llama(seed=2, hidden=32))
    small.save_pretrained(tmp_path / "small")
    cfg = base_model.config
    with pytest.raises(ValueError, match=r"Adapter 'small' .* does not fit the base model 'tiny': "
                       r"model.layers.0.self_attn.q_proj: lora_A is \[4, 32\] but the layer takes 64 inputs"):
        check_adapter("small", str(tmp_path / "small"), base_model, cfg, "tiny")
    recorded = tmp_path / "recorded"
    shutil.copytree(drift_setup["agl"], recorded)
    config = json.loads((recorded / "adapter_config.json").read_text())
    (recorded / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path=str(other))))
    with pytest.raises(ValueError, match=r"trained on .*other', a different model .*hidden_size: 32 vs 64"):
        check_adapter("rec", str(recorded), base_model, cfg, "tiny")
    (recorded / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path="org/SomeModel")))
    note = check_adapter("rec", str(recorded), base_model, cfg, "tiny")
    assert "records base model 'org/SomeModel'" in note and "shapes fit" in note
    (recorded / "adapter_config.json").write_text(json.dumps(dict(config, base_model_name_or_path="x/Tiny")))
    assert check_adapter("rec", str(recorded), base_model, cfg, "/models/tiny") is None


def test_broken_adapter_folders_are_refused(drift_setup, base_model, tmp_path):
    cfg = base_model.config
    with pytest.raises(ValueError, match="'nowhere' is not a folder; pass a PEFT adapter folder"):
        check_adapter("a", "nowhere", base_model, cfg, "tiny")
    with pytest.raises(ValueError, match="has no adapter_config.json, so it is not a PEFT adapter folder"):
        check_adapter("a", drift_setup["model"], base_model, cfg, "tiny")
    broken = tmp_path / "broken"
    shutil.copytree(drift_setup["agl"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors cannot be read"):
        check_adapter("a", str(broken), base_model, cfg, "tiny")
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no adapter_model.safetensors or adapter_model.bin"):
        check_adapter("a", str(broken), base_model, cfg, "tiny")
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        check_adapter("a", str(broken), base_model, cfg, "tiny")
