"""AutoAttach (what `agl-trl` uses inside TRL's stock script): AGL attached at the first training forward, with
∇R of that first step added at once, so every step's gradient is ∇L_task + ∇R (dense float64 reference)."""

from __future__ import annotations

import dataclasses

import pytest
from datasets import Dataset

import hfkit
import tiny
import trlkit
from agl_trl import AGLStartError, AutoAttach, TRLTrainerAdapter

MASK = trlkit.MASK
CONFIG = hfkit.agl_config(warmup_steps=3)
REL = 1e-5


def _run(tmp_path, kind, auto=None, **kw):
    model = hfkit.lora_model()
    capture = hfkit.capture_callback(model)
    trainer = trlkit.TRAINERS[kind](model, tmp_path, [capture], learning_rate=0.0, max_grad_norm=0.0,
                                    gradient_accumulation_steps=2, **kw)
    if auto is None:
        trainer.train()
    else:
        with auto:
            trainer.train()
    return capture.grads, model, trainer


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_attached_mid_first_step_gradient_is_exact_from_step_zero(tmp_path, kind):
    task, _, _ = _run(tmp_path / "plain", kind)
    auto = AutoAttach(dataclasses.replace(CONFIG, mask_path=MASK.save(tmp_path / "mask")))
    got, model, trainer = _run(tmp_path / "agl", kind, auto)
    assert isinstance(auto.adapter, TRLTrainerAdapter) and auto.adapter.trainer is trainer
    assert not auto.installed, "the global hook removes itself once attached"
    ref, _ = hfkit.reference_grads(model, MASK, CONFIG)
    for k in range(3):  # step 0 included: its ∇R was added inside the first forward, before any backward
        hfkit.assert_close(got[k], hfkit.combine(task[k], ref, CONFIG.lambda_scale(k)), REL, f"{kind}, step {k}")
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["agl/lambda_scale"] for h in logs] == pytest.approx([1 / 3, 2 / 3, 1.0])
    if kind == "dpo":
        assert trlkit.ref_adapter_untouched(model)


def test_forwards_outside_training_do_not_attach(tmp_path):
    evals = Dataset.from_list(trlkit.sft_rows(4))
    trainer = trlkit.sft_trainer(hfkit.lora_model(), tmp_path, extra={"eval_dataset": evals}, max_steps=1)
    with AutoAttach(dataclasses.replace(CONFIG, mask_path=MASK.save(tmp_path / "mask"))) as auto:
        trainer.evaluate()  # no_grad, no training_step: keep waiting
        trainer.model(**tiny.tiny_batches(1, 1, 8)[0])  # grad on, no trainer
        assert auto.adapter is None and auto.installed and auto.forwards_seen > 0
        trainer.train()
    assert auto.adapter is not None and not auto.installed


def test_attach_error_surfaces_from_train_and_removes_the_hook(tmp_path):
    trainer = trlkit.sft_trainer(hfkit.lora_model(), tmp_path, max_steps=1)
    other = hfkit.make_mask(seed=9).save(tmp_path / "other")
    auto = AutoAttach(dataclasses.replace(CONFIG, mask_path=other))
    with pytest.raises(AGLStartError, match="could not attach to SFTTrainer.*different base model"):
        with auto:
            trainer.train()
    assert not auto.installed and auto.adapter is None
