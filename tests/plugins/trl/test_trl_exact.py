"""In SFTTrainer and DPOTrainer the gradient at each optimizer step is ∇L_task + ∇R, R counted once per step.

Method as in tests/plugins/hf/test_hf_exact.py: a capture callback records the LoRA gradients at
`on_pre_optimizer_step`; with learning_rate=0 the weights never move, so step k of an AGL run and of the same run
without AGL see the same weights and data, and must differ by exactly λ_scale(k)·∇R of the dense float64
reference (tests/core/reference.py). Routes: `callbacks=[AGLCallback]` and the loss hook `AGLLossMixin`
(`agl_plugins.attach()` adds the same callback; test_trl_autoattach.py checks it this way step by step). DPO runs
on a PeftModel, so TRL adds its frozen `ref` adapter.
"""

from __future__ import annotations

import functools

import pytest

import hfkit
import trlkit
from agl_hf_callback import AGLCallback
from agl_trl import AGLLossMixin

REL = 1e-5
WARMUP = 3  # λ scales 1/3, 2/3, 1: a per-micro-batch count, or a missed step, would show
MASK = trlkit.MASK
CONFIG = hfkit.agl_config(warmup_steps=WARMUP)


@functools.cache
def mixin_class(kind: str) -> type:
    from trl import DPOTrainer, SFTTrainer

    base = {"sft": SFTTrainer, "dpo": DPOTrainer}[kind]
    return type(f"AGL{base.__name__}", (AGLLossMixin, base), {})


def run(tmp_path, kind: str, route: str, accumulation: int):
    """One lr=0 run; (captured grads per step, model, trainer)."""
    model = hfkit.lora_model()
    capture = hfkit.capture_callback(model)
    callbacks, cls, extra = [capture], None, None
    if route == "callback":
        callbacks.append(AGLCallback(CONFIG, MASK))
    elif route == "mixin":
        cls, extra = mixin_class(kind), {"agl_config": CONFIG, "agl_mask": MASK}
    trainer = trlkit.TRAINERS[kind](model, tmp_path / f"{kind}-{route}-{accumulation}", callbacks, cls=cls,
                                    extra=extra, learning_rate=0.0, max_grad_norm=0.0,
                                    gradient_accumulation_steps=accumulation,
                                    per_device_train_batch_size=2 if accumulation == 1 else 1)
    trainer.train()
    assert len(capture.grads) == 3
    if kind == "dpo":
        assert trlkit.ref_adapter_untouched(model), "DPO's frozen `ref` adapter must exist and get no gradient"
    return capture.grads, model, trainer


_PLAIN: dict = {}


def plain(tmp_factory, kind: str, accumulation: int) -> list:
    """The run without AGL, shared by both routes."""
    if (kind, accumulation) not in _PLAIN:
        _PLAIN[kind, accumulation], _, _ = run(tmp_factory.mktemp("plain"), kind, "plain", accumulation)
    return _PLAIN[kind, accumulation]


def expected(task: list, model, factor: float = 1.0) -> list:
    ref, _ = hfkit.reference_grads(model, MASK, CONFIG)
    return [hfkit.combine(task[k], ref, factor * CONFIG.lambda_scale(k)) for k in range(len(task))]


def assert_steps(actual: list, wanted: list, what: str) -> None:
    for k, (a, e) in enumerate(zip(actual, wanted)):
        hfkit.assert_close(a, e, REL, f"{what}, step {k}")


@pytest.mark.parametrize("route", ["callback", "mixin"])  # attach(): test_trl_autoattach.py, same callback
@pytest.mark.parametrize("accumulation", [1, 4])
@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_gradient_is_task_plus_penalty_once_per_step(tmp_path, tmp_path_factory, kind, accumulation, route):
    task = plain(tmp_path_factory, kind, accumulation)
    got, model, trainer = run(tmp_path, kind, route, accumulation)
    what = f"{kind}, {route}, accumulation {accumulation}"
    assert_steps(got, expected(task, model), what)
    with pytest.raises(AssertionError):  # a penalty counted per micro-batch (or twice) must not match
        assert_steps(got, expected(task, model, 2.0), f"sanity: doubled penalty, {what}")
    if route == "mixin":
        assert trainer.agl_term.penalty is not None and trainer.agl_term.last_metrics["agl/lambda_scale"] == 1.0
