"""Shared helpers of the HF Trainer adapter tests: tiny LoRA models, masks, trainers and gradient capture."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "core"))  # tests/core/reference.py: the dense float64 reference

import tiny  # noqa: E402
from reference import lora_factors, random_fisher, reference  # noqa: E402

from agl_core import AGLConfig, FisherMask, find_linear_modules  # noqa: E402

TARGETS = ("q_proj", "v_proj")
SEQ = 12


def lora_model(seed: int = 0, targets=TARGETS, dtype=torch.float32):
    """Tiny Llama + PEFT LoRA with random nonzero B (so ∇R ≠ 0); same seed → same weights."""
    return tiny.tiny_lora(tiny.tiny_llama(seed), targets=targets, seed=seed, nonzero_b=True).to(dtype)


def make_mask(seed: int = 0, rho: float = 0.05, mask_seed: int = 3, **config) -> FisherMask:
    """A coordinate mask over every linear layer of tiny_llama(seed), with the base-model fingerprint."""
    base = tiny.tiny_llama(seed)
    shapes = {n: tuple(m.weight.shape) for n, m in find_linear_modules(base).items()}
    fisher = {n: f.float() for n, f in random_fisher(shapes, mask_seed).items()}
    return FisherMask.from_fisher(fisher, AGLConfig(rho=rho, **config), model=base)


def agl_config(**kw) -> AGLConfig:
    """Every term weighted, so each contributes to ∇R."""
    base = dict(lambda_a=2.0, lambda_t=0.3, lambda_nc=0.7, alpha=0.4, rho=0.05)  # rho: make_mask's
    return AGLConfig(**{**base, **kw})


def dataset(n: int = 16, seed: int = 0, seq: int = SEQ) -> list[dict]:
    """n examples {input_ids, attention_mask, labels} of equal length (labels -100 on the first half)."""
    rows = []
    for batch in tiny.tiny_batches(n, 1, seq, seed=seed):
        rows.append({k: v[0] for k, v in batch.items()})
    return rows


def training_args(out, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True,
                dataloader_num_workers=0, per_device_train_batch_size=2, learning_rate=1e-2, max_steps=3,
                logging_steps=1, seed=0, lr_scheduler_type="constant", warmup_steps=0)
    return TrainingArguments(**{**base, **kw})


def trainer(model, out, callbacks=(), data=None, eval_data=None, **kw):
    from transformers import Trainer

    return Trainer(model=model, args=training_args(out, **kw), train_dataset=data or dataset(),
                   eval_dataset=eval_data, callbacks=list(callbacks))


def param_keys(model) -> dict[int, tuple[str, str]]:
    """id(LoRA parameter) → (base module name, 'A' | 'B')."""
    keys = {}
    for name, (A, B, _) in lora_factors(model).items():
        keys[id(A)], keys[id(B)] = (name, "A"), (name, "B")
    return keys


def capture_callback(model):
    """A TrainerCallback recording the LoRA gradients at on_pre_optimizer_step: grads[step][(name, 'A'|'B')]."""
    from transformers import TrainerCallback

    keys = param_keys(model)

    class Capture(TrainerCallback):
        def __init__(self) -> None:
            self.grads: list[dict] = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            found = {}
            for p in model.parameters():
                if id(p) in keys and p.grad is not None:
                    found[keys[id(p)]] = p.grad.detach().double().clone()
            self.grads.append(found)

    return Capture()


def reference_grads(model, mask: FisherMask, config: AGLConfig, scale: float = 1.0) -> dict:
    """∇R of the dense float64 reference at the model's current LoRA weights: {(name, 'A'|'B'): grad}."""
    factors = lora_factors(model, leaves=True)
    ref = reference(factors, mask.blocks, config, scale=scale)
    leaves = [(name, which, t) for name, (A, B, _) in factors.items() for which, t in (("A", A), ("B", B))]
    grads = torch.autograd.grad(ref["total"], [t for _, _, t in leaves])
    return {(name, which): g for (name, which, _), g in zip(leaves, grads)}, ref


def assert_close(actual: dict, expected: dict, rel: float, what: str = "") -> None:
    """Per tensor: max |a − e| ≤ rel · max |e| (+1e-12)."""
    assert set(actual) == set(expected), f"{what}: keys differ {set(actual) ^ set(expected)}"
    for key, e in expected.items():
        a = actual[key].double()
        err, size = float((a - e.double()).abs().max()), float(e.double().abs().max())
        assert err <= rel * size + 1e-12, f"{what} {key}: |err| {err:.3g} > {rel:g} × {size:.3g}"


def combine(task: dict, extra: dict, scale: float = 1.0) -> dict:
    """task + scale · extra, keyed alike."""
    return {k: task[k].double() + scale * extra[k].double() for k in task}


def clip(grads: dict, max_norm: float) -> dict:
    """What torch.nn.utils.clip_grad_norm_ does to these gradients (they are all the trainable ones)."""
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    factor = min(1.0, max_norm / (float(total) + 1e-6))
    return {k: g.double() * factor for k, g in grads.items()}
