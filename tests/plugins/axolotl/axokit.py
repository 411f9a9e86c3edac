"""Shared helpers of the Axolotl adapter tests: tiny LoRA models, a real Fisher mask, configs, datasets."""

from __future__ import annotations

import tiny
from agl_core import AGLConfig, FisherMask, estimate_fisher

TARGETS = ("q_proj", "v_proj")


def lora_model(seed: int = 0):
    """Tiny Llama + PEFT LoRA with random nonzero B (so ∇R ≠ 0 from the first step); same seed → same weights."""
    return tiny.tiny_lora(tiny.tiny_llama(seed), targets=TARGETS, seed=seed, nonzero_b=True)


def make_mask(seed: int = 0, rho: float = 0.05) -> FisherMask:
    """A coordinate mask from the real token Fisher of tiny_llama(seed) on random token batches."""
    base = tiny.tiny_llama(seed)
    fisher = estimate_fisher(base, tiny.tiny_batches(4, 2, 12, seed=seed, vocab=90), progress=False)
    return FisherMask.from_fisher(fisher, AGLConfig(rho=rho), model=base)


def agl_config(**kw) -> AGLConfig:
    """Every term weighted, so each contributes to ∇R."""
    return AGLConfig(**{**dict(lambda_a=2.0, lambda_t=0.3, lambda_nc=0.7, alpha=0.4, rho=0.05), **kw})


def token_rows(n: int = 16, seed: int = 0) -> list[dict]:
    """n rows {input_ids, attention_mask, labels} (lists) of equal length, labels -100 on the first half."""
    return [{k: v[0].tolist() for k, v in b.items()} for b in tiny.tiny_batches(n, 1, 12, seed=seed)]


def preference_rows(n: int = 16) -> list[dict]:
    return [{"prompt": f"Name colour {i}.", "chosen": f"Blue {i}.", "rejected": f"No {i}."} for i in range(n)]


def common_args(out, **kw) -> dict:
    base = dict(output_dir=str(out), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, per_device_train_batch_size=2, learning_rate=5e-2, max_steps=3,
                logging_steps=1, seed=0, lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0)
    return {**base, **kw}
