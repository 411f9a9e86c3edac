"""The loss hook (AGLLossMixin / AGLLossTerm): accumulation rule, what it logs, eval, double counting refused."""

from __future__ import annotations

import functools

import pytest
from datasets import Dataset

import hfkit
import trlkit
from agl_hf_callback import AGLCallback
from agl_plugins import attach
from agl_trl import AGLLossMixin, loss_is_scaled_for_ga
from agl_trl.loss import accumulation_divisor, trainer_reads_scaled_flag

MASK = trlkit.MASK
CONFIG = hfkit.agl_config(warmup_steps=2)


@functools.cache
def mixin(kind: str) -> type:
    from trl import DPOTrainer, SFTTrainer

    base = {"sft": SFTTrainer, "dpo": DPOTrainer}[kind]
    return type(f"AGL{base.__name__}", (AGLLossMixin, base), {})


def test_accumulation_rule_follows_the_trainer(tmp_path):
    sft = trlkit.sft_trainer(hfkit.lora_model(), tmp_path / "sft", gradient_accumulation_steps=4)
    dpo = trlkit.dpo_trainer(hfkit.lora_model(), tmp_path / "dpo", gradient_accumulation_steps=4)
    assert sft.model_accepts_loss_kwargs, "tiny Llama accepts loss kwargs: SFT normalises by num_items_in_batch"
    assert loss_is_scaled_for_ga(sft, 17) and not loss_is_scaled_for_ga(sft, None)
    assert accumulation_divisor(sft, 17) == 4 and accumulation_divisor(sft, None) == 1
    sft.current_gradient_accumulation_steps = 3  # the last, shorter accumulation of an epoch
    assert accumulation_divisor(sft, 17) == 3
    assert not loss_is_scaled_for_ga(dpo, 17) and accumulation_divisor(dpo, 17) == 1  # DPO: the trainer divides
    sft.compute_loss_func = lambda *a, **k: None
    assert loss_is_scaled_for_ga(sft, None)
    if trainer_reads_scaled_flag():  # transformers ≥ 5.19: a declared flag wins over the inferred rule
        sft.loss_is_scaled_for_ga = False
        assert not loss_is_scaled_for_ga(sft, 17)


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_logged_loss_includes_penalty_and_metrics_reach_trl_logs(tmp_path, kind):
    build = trlkit.TRAINERS[kind]
    plain = build(hfkit.lora_model(), tmp_path / "plain", learning_rate=0.0, max_steps=2, gradient_accumulation_steps=2)
    plain.train()
    agl = build(hfkit.lora_model(), tmp_path / "agl", cls=mixin(kind), extra={"agl_config": CONFIG, "agl_mask": MASK},
                learning_rate=0.0, max_steps=2, gradient_accumulation_steps=2)
    agl.train()
    logs = [h for h in agl.state.log_history if "loss" in h]
    assert [h["agl/lambda_scale"] for h in logs] == [0.5, 1.0]
    for h, task in zip(logs, _losses(plain)):
        assert h["agl/penalty"] > 0
        assert h["loss"] - task == pytest.approx(h["agl/penalty"], rel=1e-3, abs=1e-6), "loss = task + R, once"


def test_eval_loss_is_penalty_free_and_disable_switches_off(tmp_path):
    evals = Dataset.from_list(trlkit.sft_rows(4))
    plain = trlkit.sft_trainer(hfkit.lora_model(), tmp_path / "p", extra={"eval_dataset": evals})
    agl = trlkit.sft_trainer(hfkit.lora_model(), tmp_path / "a", cls=mixin("sft"),
                             extra={"eval_dataset": evals, "agl_config": CONFIG, "agl_mask": MASK})
    assert agl.evaluate()["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-7)
    agl.agl_term.disable()
    plain.args.learning_rate = agl.args.learning_rate = 0.0
    plain.train()
    agl.train()
    assert _losses(agl) == pytest.approx(_losses(plain), rel=1e-7)
    assert not any(k.startswith("agl/") for h in agl.state.log_history for k in h)


def test_two_agl_routes_at_once_are_refused(tmp_path):
    with pytest.raises(ValueError, match="twice"):
        trlkit.sft_trainer(hfkit.lora_model(), tmp_path / "a", [AGLCallback(CONFIG, MASK)], cls=mixin("sft"),
                           extra={"agl_config": CONFIG, "agl_mask": MASK})
    trainer = trlkit.sft_trainer(hfkit.lora_model(), tmp_path / "b", cls=mixin("sft"),
                                 extra={"agl_config": CONFIG, "agl_mask": MASK})
    with pytest.raises(ValueError, match="twice"):
        attach(trainer, CONFIG)


def test_mixin_start_up_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a Fisher mask"):
        trlkit.sft_trainer(hfkit.lora_model(), tmp_path / "a", cls=mixin("sft"), extra={"agl_config": CONFIG})
    with pytest.raises(ValueError, match="loss hook could not start.*different base model"):
        trlkit.sft_trainer(hfkit.lora_model(), tmp_path / "b", cls=mixin("sft"),
                           extra={"agl_config": CONFIG, "agl_mask": hfkit.make_mask(seed=9)})
