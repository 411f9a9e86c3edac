"""LoRA fine-tunes of the main job, through the real Hugging Face `Trainer` (AGL attached with `attach()`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from agl_core.batches import encode_response, pad_id, render_prompt

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
    """Chat-template prompt + response ids; labels only on the response (completion-only loss)."""
    out = []
    for r in rows:
        p = render_prompt(tokenizer, r["prompt"])
        a = encode_response(tokenizer, r["response"])
        ids = (p + a)[:max_length]
        labels = ([-100] * len(p) + a)[:max_length]
        if any(t != -100 for t in labels):
            out.append({"input_ids": ids, "labels": labels})
    if not out:
        raise ValueError(f"No training example keeps a response token within max_length={max_length}.")
    return out


class PadCollator:
    """Right-pads a list of encoded rows into a batch (labels padded with -100)."""

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), width), self.pad, dtype=torch.long)
        labels = torch.full((len(feats), width), -100, dtype=torch.long)
        mask = torch.zeros((len(feats), width), dtype=torch.long)
        for i, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def steps_for(n_rows: int, spec: FinetuneSpec) -> int:
    return max(1, math.ceil(n_rows / spec.batch_size) * math.ceil(spec.epochs))


def lora_finetune(model: Any, tokenizer: Any, rows: list[dict], spec: FinetuneSpec, out_dir: str,
                  *, log_every: int = 10, progress: bool = True) -> tuple[Any, list[dict]]:
    """Train a fresh LoRA adapter on `rows` ({prompt, response}); returns (PeftModel, trainer log history).

    With `spec.agl` set, AGL is attached to the same Trainer by `agl_plugins.attach` — the only difference from
    the plain run, which uses the same data order, seed, initialisation and number of steps.
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
    trainer = Trainer(model=peft_model, args=args, train_dataset=data, data_collator=PadCollator(pad_id(tokenizer)))
    if spec.agl is not None:
        from .. import attach

        attach(trainer, spec.agl)
    trainer.train()
    peft_model.eval()
    return peft_model, list(trainer.state.log_history)


@torch.no_grad()
def mean_nll(model: Any, tokenizer: Any, rows: list[dict], *, max_length: int = 160, batch_size: int = 16) -> float:
    """Token-averaged NLL of the responses in `rows` under `model` (the held-out task loss)."""
    data = encode_rows(tokenizer, rows, max_length)
    collate = PadCollator(pad_id(tokenizer))
    device = next(model.parameters()).device
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    for start in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in collate(data[start:start + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        lp = torch.log_softmax(logits.float(), dim=-1)
        nll = -lp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total += float(nll[keep].sum())
        count += int(keep.sum())
    model.train(was_training)
    return total / max(count, 1)
