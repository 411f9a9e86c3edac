"""LoRA fine-tunes of the main job, through the real Hugging Face `Trainer` (AGL attached with `attach()`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from agl_core.batches import IGNORE, encode_response, make_batches, pad_examples, pad_id, render_prompt

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_LINEAR = ATTN + ("gate_proj", "up_proj", "down_proj")


@dataclass
class FinetuneSpec:
    """How one LoRA fine-tune runs: identical for plain LoRA and LoRA + AGL except `agl`."""

    lr: float = 5e-4
    epochs: float = 3.0
    batch_size: int = 8
    max_length: int = 160
    r: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ATTN
    seed: int = 0
    warmup_ratio: float = 0.05
    agl: Optional[Any] = None  # an AGLConfig (with mask_path) or None for plain LoRA
    extra: dict = field(default_factory=dict)


def encode_rows(tokenizer: Any, rows: list[dict], max_length: int) -> list[dict]:
    """Chat-template prompt and response ids per row (loss on the response only, see `pad_examples`), plus the cut
    input_ids that the length-grouped sampler measures. Rows whose prompt fills `max_length` are dropped."""
    out = []
    for r in rows:
        p, a = render_prompt(tokenizer, r["prompt"]), encode_response(tokenizer, r["response"])
        if len(p) < max_length and a:
            out.append({"prompt_ids": p, "target_ids": a, "input_ids": (p + a)[:max_length]})
    if not out:
        raise ValueError(f"No training example keeps a response token within max_length={max_length}.")
    return out


class PadCollator:
    """The Trainer's collator: agl_core's right-padded batch of the rows' (prompt, response) ids."""

    def __init__(self, pad: int, max_length: int) -> None:
        self.pad, self.max_length = pad, max_length

    def __call__(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        return pad_examples([(f["prompt_ids"], f["target_ids"]) for f in feats], self.pad, self.max_length)


def steps_for(n_rows: int, spec: FinetuneSpec) -> int:
    return max(1, math.ceil(n_rows / spec.batch_size) * math.ceil(spec.epochs))


def lora_finetune(model: Any, tokenizer: Any, rows: list[dict], spec: FinetuneSpec, out_dir: str,
                  *, log_every: int = 10, progress: bool = True,
                  step_log: Optional[Callable[[str], None]] = None) -> tuple[Any, list[dict]]:
    """Train a fresh LoRA adapter on `rows` ({prompt, response}); returns (PeftModel, trainer log history).

    With `spec.agl` set, AGL is attached to the same Trainer by `agl_plugins.attach` — the only difference from
    the plain run, which uses the same data order, seed, initialisation and number of steps. `step_log` gets a
    line per logging step instead of a progress bar (for fine-tunes running side by side in worker processes).
    """
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, set_seed

    set_seed(spec.seed)
    data = encode_rows(tokenizer, rows, spec.max_length)
    peft_model = get_peft_model(model, LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=0.0,
                                                  target_modules=list(spec.targets), task_type="CAUSAL_LM"))
    args = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=spec.batch_size, learning_rate=spec.lr,
        num_train_epochs=spec.epochs, lr_scheduler_type="cosine", warmup_steps=spec.warmup_ratio,
        logging_steps=min(log_every, steps_for(len(data), spec)),  # a short run still logs its metrics once
        save_strategy="no", report_to=[], seed=spec.seed, data_seed=spec.seed,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=not progress, remove_unused_columns=False,
        dataloader_num_workers=0, weight_decay=0.0, train_sampling_strategy="group_by_length",  # less padding
        **spec.extra,
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=data, processing_class=tokenizer,
                      data_collator=PadCollator(pad_id(tokenizer), spec.max_length))
    if spec.agl is not None:
        from .. import attach

        attach(trainer, spec.agl)
    if step_log is not None:  # one line per logging step instead of the Trainer's printed dicts
        from transformers import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        trainer.add_callback(step_lines_callback(step_log))
    trainer.train()
    peft_model.eval()
    return peft_model, list(trainer.state.log_history)


def mean_nll(model: Any, tokenizer: Any, rows: list[dict], *, max_length: int = 160, batch_size: int = 16) -> float:
    """Token-averaged NLL of the responses in `rows` under `model` (the held-out task loss): the forgetting probe's
    per-example NLLs, weighted by each example's number of scored tokens."""
    from ..forgetting.probe import prompt_nll

    batches = make_batches(rows, tokenizer, batch_size=batch_size, max_length=max_length)
    per_example = prompt_nll(model, batches)
    counts = np.array([n for b in batches for n in (b["labels"][:, 1:] != IGNORE).sum(1).tolist()], dtype=np.float64)
    if not counts.sum():
        raise ValueError(f"No held-out example keeps a response token within max_length={max_length}.")
    return float((per_example * counts).sum() / counts.sum())


def step_lines_callback(emit: Callable[[str], None]) -> Any:
    """A TrainerCallback that reports each logging step as one line: 'step 20/75 loss 0.412 (1.3 min)'."""
    import time

    from transformers import TrainerCallback

    class StepLines(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            self.t0 = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                emit(f"step {state.global_step}/{state.max_steps} loss {logs['loss']:.3f} "
                     f"({(time.perf_counter() - self.t0) / 60:.1f} min)")

    return StepLines()
