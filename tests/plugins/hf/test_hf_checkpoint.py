"""Checkpoints: AGL state saved with each checkpoint, restored on resume; a resumed run reproduces the losses."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import hfkit
from agl_hf_callback import STATE_FILE, AGLCallback

MASK = hfkit.make_mask()
CONFIG = hfkit.agl_config(warmup_steps=4)  # still warming up at the resume points: the scale must continue


def run(out, mask=MASK, resume=None, **kw):
    model = hfkit.lora_model()
    callback = AGLCallback(CONFIG, mask)
    settings = dict(max_steps=6, save_strategy="steps", save_steps=2, logging_steps=1, learning_rate=2e-2)
    trainer = hfkit.trainer(model, out, [callback], **{**settings, **kw})
    trainer.train(resume_from_checkpoint=resume)
    return trainer, model, callback


def resumable_copy(src, dst, step: int):
    """An output_dir holding only checkpoint-<step> of `src`: what an interrupted run leaves behind."""
    shutil.copytree(src / f"checkpoint-{step}", dst / f"checkpoint-{step}")
    return dst


def by_step(trainer) -> dict:
    return {h["step"]: h for h in trainer.state.log_history if "loss" in h}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    trainer, model, _ = run(out)
    return out, by_step(trainer), {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_state_file_in_every_checkpoint(full_run):
    out, _, _ = full_run
    for step in (2, 4, 6):
        saved = json.loads((out / f"checkpoint-{step}" / STATE_FILE).read_text())
        assert saved["format"] == "agl-hf-callback-state" and saved["global_step"] == step
        assert saved["mask_identity"] == MASK.identity()
        assert saved["lambda_scale_next"] == CONFIG.lambda_scale(step) and saved["warmup_steps"] == 4
        assert saved["config"]["lambda_a"] == CONFIG.lambda_a
    assert not list(out.rglob("*.agl-tmp")), "atomic writes leave no temp folders"
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert [h["step"] for h in history if "agl/penalty" in h] == [1, 2, 3, 4, 5, 6]  # the plain callback path


def test_resume_reproduces_losses_and_metrics(full_run, tmp_path):
    out, full, weights = full_run
    trainer, model, _ = run(resumable_copy(out, tmp_path, 2), resume=True)
    resumed = by_step(trainer)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # 1, 2 come back with the checkpoint's trainer_state.json
    for step, entry in resumed.items():
        assert entry["loss"] == pytest.approx(full[step]["loss"], rel=1e-6), step
        for key in ("agl/penalty", "agl/L_A", "agl/L_T", "agl/lambda_scale"):
            assert entry[key] == pytest.approx(full[step][key], rel=1e-6), (step, key)
    assert resumed[3]["agl/lambda_scale"] == CONFIG.lambda_scale(2)  # warm-up continues from global_step
    final = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    for key, value in weights.items():
        torch.testing.assert_close(final[key], value, rtol=1e-6, atol=1e-8)


def test_resume_restores_the_metric_window(tmp_path):
    """logging every 3 steps, checkpoints every 2: the window open at checkpoint-4 (step 4) must survive."""
    full, _, _ = run(tmp_path / "full", logging_steps=3)
    saved = json.loads((tmp_path / "full" / "checkpoint-4" / STATE_FILE).read_text())
    assert saved["window"]["count"] == 1
    resumed, _, _ = run(resumable_copy(tmp_path / "full", tmp_path / "resumed", 4), resume=True, logging_steps=3)
    want, got = by_step(full)[6], by_step(resumed)[6]
    for key in ("agl/penalty", "agl/L_A", "agl/E_rie", "agl/lambda_scale"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key


def test_resume_with_another_mask_stops(full_run, tmp_path):
    out, _, _ = full_run
    other = hfkit.make_mask(mask_seed=11)
    with pytest.raises(ValueError, match=r"could not resume.*trained with AGL mask .*Resume with the same mask"):
        run(resumable_copy(out, tmp_path, 4), mask=other, resume=True)


def test_resume_without_agl_state_warns(full_run, tmp_path):
    out, full, _ = full_run
    folder = resumable_copy(out, tmp_path, 4)
    (folder / "checkpoint-4" / STATE_FILE).unlink()
    with pytest.warns(UserWarning, match="no agl_state.json of that step was found"):
        trainer, _, _ = run(folder, resume=True)
    assert by_step(trainer)[5]["agl/penalty"] == pytest.approx(full[5]["agl/penalty"], rel=1e-6)


def test_resume_from_outside_output_dir_via_args(full_run, tmp_path):
    """The state is found through TrainingArguments.resume_from_checkpoint when output_dir differs."""
    out, _, _ = full_run
    other = hfkit.make_mask(mask_seed=11)
    checkpoint = str(out / "checkpoint-4")
    with pytest.raises(ValueError, match="could not resume"):
        run(tmp_path / "elsewhere", mask=other, resume=checkpoint, resume_from_checkpoint=checkpoint)


def test_damaged_state_file_is_a_clear_error(full_run, tmp_path):
    out, _, _ = full_run
    folder = resumable_copy(out, tmp_path, 4)
    (folder / "checkpoint-4" / STATE_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="Cannot read the AGL checkpoint state.*delete the file"):
        run(folder, resume=True)
