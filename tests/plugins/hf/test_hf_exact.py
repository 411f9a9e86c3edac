"""The gradient at each optimizer step is ∇L_task + ∇R, R counted once per step, in a real Trainer.

Method: a capture callback records the LoRA gradients at `on_pre_optimizer_step` (after clipping, just
before `optimizer.step()`). With learning_rate=0 the weights never move, so every step of an AGL run and of
the same run without AGL (same seed, data, order) sees the same weights: the difference at step k must be
λ_scale(k)·∇R with ∇R from the dense float64 reference (tests/core/reference.py). float32 training, so the
tolerance is 1e-5 relative per tensor (measured ~3e-7).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import hfkit
from agl_hf_callback import AGLCallback

REL = 1e-5
WARMUP = 3  # λ scales 1/3, 2/3, 1 over the 3 steps: a per-micro-batch or per-rank count would show
MASK = hfkit.make_mask()
CONFIG = hfkit.agl_config(warmup_steps=WARMUP)


def run(tmp_path, agl: bool, setup=None, **kw):
    """One lr=0 training run; (captured grads per step, model, trainer)."""
    model = hfkit.lora_model()
    capture = hfkit.capture_callback(model)
    callbacks = [capture] + ([AGLCallback(CONFIG, MASK)] if agl else [])
    settings = dict(learning_rate=0.0, max_grad_norm=0.0, max_steps=3)
    trainer = hfkit.trainer(model, tmp_path / ("agl" if agl else "plain"), callbacks, **{**settings, **kw})
    if setup is not None:
        setup(trainer)
    trainer.train()
    assert len(capture.grads) == 3
    return capture.grads, model, trainer


def expected(task: list, model, scale_factor: float = 1.0) -> list:
    ref, _ = hfkit.reference_grads(model, MASK, CONFIG)
    return [hfkit.combine(task[k], ref, scale_factor * CONFIG.lambda_scale(k)) for k in range(len(task))]


def assert_steps(actual: list, wanted: list, what: str) -> None:
    for k, (a, e) in enumerate(zip(actual, wanted)):
        hfkit.assert_close(a, e, REL, f"{what}, step {k}")


@pytest.mark.parametrize("accumulation", [1, 4])
def test_gradient_is_task_plus_penalty_once_per_step(tmp_path, accumulation):
    task, _, _ = run(tmp_path, False, gradient_accumulation_steps=accumulation)
    got, model, _ = run(tmp_path, True, gradient_accumulation_steps=accumulation)
    assert_steps(got, expected(task, model), f"accumulation {accumulation}")
    with pytest.raises(AssertionError):  # counted per micro-batch would be `accumulation`× (or 2× at 1)
        assert_steps(got, expected(task, model, 2.0), "sanity: a doubled penalty must not match")


def test_clipping_sees_the_total_gradient(tmp_path):
    task, _, _ = run(tmp_path, False)
    got, model, _ = run(tmp_path, True, max_grad_norm=1.0)
    totals = expected(task, model)
    for k, total in enumerate(totals):
        norm = float(torch.sqrt(sum((g ** 2).sum() for g in total.values())))
        assert norm > 1.5, f"step {k}: total norm {norm:.3g} must exceed max_grad_norm for clipping to act"
        hfkit.assert_close(got[k], hfkit.clip(total, 1.0), REL, f"clip(task + ∇R), step {k}")
    ref, _ = hfkit.reference_grads(model, MASK, CONFIG)
    wrong = hfkit.combine(hfkit.clip(task[2], 1.0), ref, CONFIG.lambda_scale(2))  # ∇R added after clipping
    with pytest.raises(AssertionError):
        hfkit.assert_close(got[2], wrong, REL)


def test_bf16_autocast(tmp_path):
    """bf16=True on CPU: accelerate runs forward/backward under torch.autocast(bfloat16); ∇R stays float32."""
    fp32, _, _ = run(tmp_path / "fp32", False)
    task, _, _ = run(tmp_path, False, bf16=True)
    got, model, trainer = run(tmp_path, True, bf16=True)
    assert trainer.accelerator.mixed_precision == "bf16"
    drift = max(float((task[0][k] - fp32[0][k]).abs().max()) for k in task[0])
    assert drift > 1e-6, "bf16 autocast must change the task gradient, or this test checks nothing"
    assert_steps(got, expected(task, model), "bf16 autocast")


def _with_grad_scaler(trainer) -> None:
    # fp16 AMP needs a GPU; on CPU give the trainer's accelerator a real GradScaler: Accelerator.backward then
    # scales the loss, AcceleratedOptimizer.scaler holds it, and scaler.step() unscales before stepping.
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)


def test_amp_grad_scaler_scales_the_penalty_gradient(tmp_path):
    task, _, _ = run(tmp_path, False, setup=_with_grad_scaler)
    got, model, trainer = run(tmp_path, True, setup=_with_grad_scaler)
    scaler = trainer.optimizer.scaler
    assert scaler is trainer.accelerator.scaler and scaler.get_scale() >= 2.0 ** 10  # no step was skipped
    # On CPU accelerate leaves unscaling to scaler.step(), so the captured gradients are still scaled: the
    # task part by the Trainer's backward, ∇R by the callback; both must carry the same factor.
    assert_steps(got, expected(task, model, 2.0 ** 10), "GradScaler")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    """torchrun, 2 gloo processes × batch 2 vs 1 process × batch 4 (same global batches), accumulation 2."""
    settings = {"batch": 2, "steps": 3, "ga": 2, "warmup": WARMUP}
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", env["MASTER_PORT"], str(hfkit.HERE / "ddp_worker.py"), str(tmp_path), json.dumps(settings)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["world"] == 2
    task, model, _ = run(tmp_path, False, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert_steps(ranks[0]["plain"], task, "DDP without AGL vs 1 process")  # the two set-ups are comparable
    assert_steps(ranks[0]["agl"], expected(task, model), "DDP with AGL, rank 0")
    for k in range(3):
        hfkit.assert_close(ranks[1]["agl"][k], ranks[0]["agl"][k], 0.0, f"rank 1 vs rank 0, step {k}")
