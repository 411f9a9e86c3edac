"""The plugin's mask: estimated with the trainer's model and tokenizer when missing, reused while it fits, else redone."""

from __future__ import annotations

import json
import os

import pytest
import torch

import tiny
from agl_axolotl.masks import CREATOR, MaskPlan, ensure_mask, mask_file, training_config
from agl_core import AGLConfig, FisherMask, estimate_fisher, make_batches

ALIGNMENT = [
    {"prompt": "How do I pick my neighbour's lock?", "label": "unsafe", "response": "I can't help with that."},
    {"prompt": "Write ransomware for me.", "label": "unsafe"},  # gets a written refusal (agl_plugins.prompts)
    {"prompt": "Name a colour.", "label": "safe"},  # no response: the base model answers greedily
    {"prompt": "Give me a sleep tip.", "label": "safe", "response": "Keep a regular bedtime."},
]
CONFIG = AGLConfig(rho=0.05, lambda_a=2.0)


@pytest.fixture()
def data(tmp_path):
    path = tmp_path / "align.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ALIGNMENT), encoding="utf-8")
    return path


def fisher_opts(data, **kw):
    base = dict(alignment_dataset=str(data), reference_dataset=None, max_examples=None, batch_size=2,
                max_length=64, max_new_tokens=4)
    return {**base, **kw}


def run(model, tmp_path, data, config=CONFIG, **kw):
    lines: list[str] = []
    plan = ensure_mask(model, tiny.tiny_tokenizer(), config, fisher_opts(data, **kw), output_dir=tmp_path / "out",
                       model_name="tiny", log=lines.append)
    return plan, "\n".join(lines)


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_estimates_on_the_base_model_saves_next_to_the_output_and_equals_a_direct_core_call(tmp_path, data):
    model = tiny.tiny_lora(tiny.tiny_llama(0), nonzero_b=True)  # adapters must be off while estimating
    model.train()
    before = lora_state(model)
    plan, log = run(model, tmp_path, data)
    assert plan == MaskPlan(tmp_path / "out" / "agl_mask" / "mask.safetensors", "estimate", plan.reason)
    assert "no mask at" in log and "saved the mask to" in log and plan.path.is_file()
    # the model is left as it was: same LoRA weights, no gradients, training mode restored
    assert all(torch.equal(p, lora_state(model)[n]) for n, p in before.items())
    assert all(p.grad is None for p in model.parameters()) and model.training
    mask = FisherMask.load(plan.path)
    assert mask.metadata["created_by"] == CREATOR and mask.metadata[CREATOR]["recipe"]["rho"] == 0.05
    assert mask.metadata["data"]["ids"] == [f"align.jsonl:{i}" for i in range(1, 5)]
    # direct agl_core: the same records on the plain base model (greedy targets for the safe prompt without one)
    base, tok = tiny.tiny_llama(0), tiny.tiny_tokenizer()
    from agl_plugins.prompts import read_records

    rows = [{"prompt": r["prompt"], "response": r["response"] or None} for r in read_records(data)]
    batches = make_batches(rows, tok, batch_size=2, max_length=64, model=base, max_new_tokens=4)
    direct = FisherMask.from_fisher(estimate_fisher(base, batches, progress=False), CONFIG, model=base)
    assert mask.blocks.keys() == direct.blocks.keys()
    for name, block in direct.blocks.items():
        assert torch.equal(mask.blocks[name].index, block.index), name
        torch.testing.assert_close(mask.blocks[name].fisher, block.fisher, rtol=1e-6, atol=0)


def test_reuses_its_mask_while_model_and_settings_match(tmp_path, data):
    model = tiny.tiny_lora(tiny.tiny_llama(0))
    first, _ = run(model, tmp_path, data)
    stamp = first.path.stat().st_mtime_ns
    plan, log = run(model, tmp_path, data)
    assert plan.action == "reuse" and "reusing the mask" in log and "fingerprint and settings match" in log
    assert first.path.stat().st_mtime_ns == stamp


def test_re_estimates_for_another_base_model_with_a_log_line(tmp_path, data):
    run(tiny.tiny_lora(tiny.tiny_llama(0)), tmp_path, data)
    other = tiny.tiny_lora(tiny.tiny_llama(1))
    plan, log = run(other, tmp_path, data)
    assert plan.action == "estimate" and "does not fit this base model" in log and "estimating" in log
    FisherMask.load(plan.path).check_model(other)  # the new mask belongs to the new model
    with pytest.raises(ValueError, match="different base model"):
        FisherMask.load(plan.path).check_model(tiny.tiny_llama(0))


def test_re_estimates_when_the_recipe_or_the_data_change(tmp_path, data):
    model = tiny.tiny_lora(tiny.tiny_llama(0))
    run(model, tmp_path, data)
    steps = [  # each run changes one thing relative to the mask the previous run left
        (dict(config=AGLConfig(rho=0.1)), "rho: 0.05 → 0.1"),
        (dict(config=AGLConfig(rho=0.1), max_new_tokens=6), "max_new_tokens: 4 → 6"),
        (dict(config=AGLConfig(rho=0.1, target_modules=["q_proj"]), max_new_tokens=6), "target_modules: None → ['q_proj']"),
    ]
    for change, expect in steps:
        plan, log = run(model, tmp_path, data, **change)
        assert plan.action == "estimate" and "other settings" in log and expect in log, log
    data.write_text(data.read_text() + json.dumps({"prompt": "Steal a car.", "label": "unsafe"}) + "\n")
    plan, log = run(model, tmp_path, data, **steps[-1][0])
    assert plan.action == "estimate" and "data_sha256" in log


def test_a_users_mask_is_used_as_given_never_overwritten(tmp_path, data):
    base = tiny.tiny_llama(0)
    user = FisherMask.from_fisher(estimate_fisher(base, tiny.tiny_batches(vocab=90), progress=False),
                                  AGLConfig(rho=0.2), model=base)
    path = user.save(tmp_path / "mine")
    content = open(path, "rb").read()
    config = AGLConfig(rho=0.05, mask_path=str(tmp_path / "mine"))
    plan, log = run(tiny.tiny_lora(tiny.tiny_llama(0)), tmp_path, data, config=config)
    assert plan == MaskPlan(mask_file(config.mask_path, None), "use", plan.reason) and "not estimated by" in log
    assert open(path, "rb").read() == content
    warnings: list[str] = []
    trained = training_config(config, plan, warn=warnings.append)
    assert trained.rho == 0.2 and trained.mask_path == str(plan.path) and trained.lambda_a == config.lambda_a
    assert "keeps its own settings (rho: agl 0.05, mask 0.2)" in warnings[0]


def test_mask_path_missing_is_estimated_there_only_with_a_dataset(tmp_path, data):
    model = tiny.tiny_lora(tiny.tiny_llama(0))
    config = AGLConfig(rho=0.05, mask_path=str(tmp_path / "masks" / "run1"))
    with pytest.raises(ValueError, match="found no mask at agl.mask_path .* set agl.alignment_dataset"):
        run(model, tmp_path, data, config=config, alignment_dataset=None)
    plan, _ = run(model, tmp_path, data, config=config)
    assert plan.action == "estimate" and plan.path == tmp_path / "masks" / "run1" / "mask.safetensors"
    assert plan.path.is_file()
    again, log = run(model, tmp_path, data, config=config, alignment_dataset=None)  # ours, but no dataset to check
    assert again.action == "use" and "alignment_dataset not set" in log


def test_damaged_files(tmp_path, data):
    model = tiny.tiny_lora(tiny.tiny_llama(0))
    own = tmp_path / "out" / "agl_mask" / "mask.safetensors"
    os.makedirs(own.parent)
    own.write_bytes(b"not a mask")
    plan, log = run(model, tmp_path, data)  # our own folder: re-estimated
    assert plan.action == "estimate" and "not a usable mask" in log
    FisherMask.load(own)
    user = tmp_path / "user.safetensors"
    user.write_bytes(b"not a mask")
    plan, _ = run(model, tmp_path, data, config=AGLConfig(mask_path=str(user)))
    assert plan.action == "use" and user.read_bytes() == b"not a mask"  # the callback reports it at start-up


def test_no_tokenizer_and_no_output_dir_are_clear_errors(tmp_path, data):
    model = tiny.tiny_lora(tiny.tiny_llama(0))
    with pytest.raises(ValueError, match="needs the trainer's tokenizer"):
        ensure_mask(model, None, CONFIG, fisher_opts(data), output_dir=tmp_path, log=lambda _: None)
    with pytest.raises(ValueError, match="needs output_dir"):
        ensure_mask(model, tiny.tiny_tokenizer(), CONFIG, fisher_opts(data), output_dir=None)
