"""Models as users and trainers hand them over: inner PEFT objects, wrappers, stacked adapters, other bases."""

import pytest
import torch
from peft import LoraConfig
from torch import nn

import tiny
from agl_core import AGLConfig, AGLPenalty, FisherMask, estimate_fisher, estimate_input_covariance
from agl_core.batches import make_batches
from agl_core.kfac import top_eigenpairs
from agl_core.modules import base_name, find_lora_targets


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_fisher_through_inner_peft_objects_equals_the_base_model():
    base = tiny.tiny_llama(seed=3)
    plain = estimate_fisher(base, tiny.tiny_batches(), progress=False)
    peft_model = tiny.tiny_lora(tiny.tiny_llama(seed=3), r=4)
    lora_params = {n: p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n}
    for inner in (peft_model, peft_model.base_model, peft_model.base_model.model):
        got = estimate_fisher(inner, tiny.tiny_batches(), progress=False)
        assert list(got) == list(plain)  # base-model names whatever object is passed
        assert max(rel(got[k], plain[k]) for k in plain) < 1e-6
    assert {n: p.requires_grad for n, p in peft_model.named_parameters() if "lora_" in n} == lora_params
    assert not any(m.disable_adapters for m in peft_model.modules() if hasattr(m, "lora_A"))


def test_already_disabled_adapters_stay_disabled():
    peft_model = tiny.tiny_lora(r=4)
    peft_model.base_model.disable_adapter_layers()
    estimate_fisher(peft_model, tiny.tiny_batches(n_batches=1), progress=False)
    flags = [m.disable_adapters for m in peft_model.modules() if hasattr(m, "lora_A")]
    assert flags and all(flags)


def test_generation_from_records_does_not_leak_into_statistics():
    tok, model = tiny.tiny_tokenizer(), tiny.tiny_llama(seed=1)
    records = [{"prompt": "hello there"}, {"prompt": "what is two plus two"}]
    direct = estimate_input_covariance(model, records, tokenizer=tok, progress=False)
    batches = make_batches(records, tok, generate="never")
    expected = estimate_input_covariance(model, list(batches), progress=False)
    assert max(rel(direct[k], expected[k]) for k in expected) < 1e-6
    kwargs = dict(model=model, max_new_tokens=5)
    lazy = estimate_fisher(model, make_batches(records, tok, **kwargs), progress=False)
    ready = make_batches(records, tok, **kwargs)
    pregenerated = [ready[i] for i in range(len(ready))]  # targets generated before any hook exists
    eager = estimate_fisher(model, pregenerated, progress=False)
    assert max(rel(lazy[k], eager[k]) for k in eager) < 1e-6


class Wrapper(nn.Module):
    """Names its child `module`, as DistributedDataParallel does."""

    def __init__(self, inner):
        super().__init__()
        self.module = inner


def test_wrapper_prefixes_are_dropped():
    assert base_name("module.base_model.model.model.layers.0.q") == "model.layers.0.q"
    assert base_name("_orig_mod.base_model.model.model.layers.0.q") == "model.layers.0.q"
    assert base_name("model.layers.0._fsdp_wrapped_module.q") == "model.layers.0.q"
    peft_model = tiny.tiny_lora(r=4)
    names = {t.name for t in find_lora_targets(Wrapper(peft_model))}
    assert names == {t.name for t in find_lora_targets(peft_model)}


def _mask_for(model, seed):
    fisher = estimate_fisher(model, tiny.tiny_batches(seed=seed), progress=False)
    return FisherMask.from_fisher(fisher, AGLConfig(rho=0.05), model=model)


def test_penalty_refuses_a_mask_of_another_base_model():
    mask = _mask_for(tiny.tiny_llama(seed=5), 0)
    with pytest.raises(ValueError, match="different base model"):
        AGLPenalty(tiny.tiny_lora(tiny.tiny_llama(seed=6), r=4), mask)
    AGLPenalty(tiny.tiny_lora(tiny.tiny_llama(seed=5), r=4), mask)  # the same base is accepted
    AGLPenalty(tiny.tiny_lora(tiny.tiny_llama(seed=6), r=4), mask, check_fingerprint=False)


def test_penalty_works_on_a_wrapped_model():
    model = tiny.tiny_lora(tiny.tiny_llama(seed=5), r=4)
    mask = _mask_for(tiny.tiny_llama(seed=5), 0)
    direct, wrapped = AGLPenalty(model, mask)(), AGLPenalty(Wrapper(model), mask)()
    assert torch.equal(direct.total, wrapped.total) and float(direct.total.detach()) > 0


def test_two_trainable_adapters_on_one_layer_are_refused():
    model = tiny.tiny_lora(tiny.tiny_llama(seed=5), r=4, targets=("q_proj",))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["q_proj"]))
    model.base_model.set_adapter(["default", "second"])
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    mask = _mask_for(tiny.tiny_llama(seed=5), 0)
    with pytest.raises(ValueError, match="several active trainable LoRA adapters"):
        AGLPenalty(model, mask)
    assert AGLPenalty(model, mask, AGLConfig(rho=0.05, adapters=["second"]))().total.item() == 0.0  # B = 0


def test_float32_round_off_directions_are_not_protected():
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(20, 10, generator=gen)
    x = (basis @ basis.T).float()  # rank 10, accumulated in float32
    vals, _ = top_eigenpairs(x, 20)
    assert int((vals > 0).sum()) == 10
