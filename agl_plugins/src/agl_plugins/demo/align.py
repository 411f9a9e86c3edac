"""The aligned base: SmolLM2-135M-Instruct with a refusal behaviour trained in (it refuses nothing out of the box).

Recipe (deterministic): refuse the unsafe training prompts (alignment-v1 `fisher` split + Do-Not-Answer malicious
uses, written refusals), keep answering ordinary prompts as before (targets: the model's own greedy answers), one
LoRA adapter trained with the Hugging Face Trainer, then merged into the weights. The adapter is shipped in the
package (data/aligned-v1/) so users need not retrain it; `agl demo align-base` reproduces it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from agl_core.batches import generate_targets

from ..models import build_atomically, cache_root, is_complete, load_model_and_tokenizer
from ..prompts import DATA_DIR, alignment_v1
from .data import align_unsafe, request_prompts, check_disjoint, eval_records, read_jsonl, split_benign, write_jsonl
from .train import ALL_LINEAR, FinetuneSpec, lora_finetune

ADAPTER_DIR = DATA_DIR / "aligned-v1"
ALIGNED_NAME = "smollm2-135m-instruct-aligned-v1"
SPEC = FinetuneSpec(lr=8e-4, epochs=1, batch_size=8, max_length=160, r=16, alpha=32, targets=ALL_LINEAR, seed=0)
SAFE_NEW_TOKENS = 48


def align_safe_prompts() -> list[str]:
    """Ordinary prompts whose own answers the aligned base keeps: alignment-v1 `fisher` safe + written benign."""
    rows = [r["prompt"] for r in alignment_v1().records("fisher") if r["label"] == "safe"]
    return rows + split_benign()["align"] + request_prompts()


def training_rows(model: Any, tokenizer: Any, progress: Callable[[str], None]) -> list[dict]:
    """Refusal rows for unsafe prompts and the model's own greedy answers for safe ones, interleaved."""
    unsafe = align_unsafe()
    safe = align_safe_prompts()
    check_disjoint([r["prompt"] for r in unsafe] + safe, [r["prompt"] for r in eval_records()], "alignment-training")
    progress(f"aligned base: generating the model's own answers to {len(safe)} ordinary prompts")
    ids = generate_targets(model, tokenizer, safe, max_new_tokens=SAFE_NEW_TOKENS, batch_size=16)
    answers = [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
    safe_rows = [{"prompt": p, "response": a, "label": "safe"} for p, a in zip(safe, answers) if a]
    rows = []
    for i in range(max(len(unsafe), len(safe_rows))):
        rows += [unsafe[i]] if i < len(unsafe) else []
        rows += [safe_rows[i]] if i < len(safe_rows) else []
    return rows


def train_adapter(out: Path, progress: Callable[[str], None] = print, base: str = "smollm2-135m-instruct") -> Path:
    """Train the alignment adapter from the packaged model and save it (PEFT folder) into `out`."""
    torch.manual_seed(SPEC.seed)
    model, tokenizer = load_model_and_tokenizer(base, progress=progress)
    tmp = out.with_name(out.name + ".work")
    cached = tmp / "training_rows.jsonl"  # the generated answers survive an interrupted run
    rows = read_jsonl(cached)
    if rows is None:
        rows = training_rows(model, tokenizer, progress)
        tmp.mkdir(parents=True, exist_ok=True)
        write_jsonl(cached, rows)
    progress(f"aligned base: LoRA r={SPEC.r} on {len(rows)} rows, {SPEC.epochs:g} epochs")
    peft_model, _ = lora_finetune(model, tokenizer, rows, SPEC, str(tmp))

    staged = out.with_name(out.name + ".new")
    shutil.rmtree(staged, ignore_errors=True)
    peft_model.save_pretrained(str(staged))
    (staged / "training_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if out.exists():  # swap in the finished folder: never a half-written adapter under `out`
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staged.rename(out)
        shutil.rmtree(old)
    else:
        staged.rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def aligned_base_dir() -> Path:
    return cache_root() / "models" / ALIGNED_NAME


def ensure_aligned_base(progress: Callable[[str], None] = print, adapter: Optional[Path] = None) -> Path:
    """The aligned base as a plain HF folder (packaged model + shipped adapter, merged), built once and cached."""
    dest = aligned_base_dir()
    if is_complete(dest):
        return dest
    adapter = adapter or ADAPTER_DIR
    if not (adapter / "adapter_model.safetensors").exists():
        raise FileNotFoundError(f"The aligned-base adapter is missing at {adapter}; rebuild it with "
                                f"`agl demo align-base` (about 10 minutes on 2 CPU cores).")

    def build(folder: Path) -> None:
        from peft import PeftModel

        model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct", progress=progress)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))

    progress(f"aligned base: merging {adapter.name} into SmolLM2-135M-Instruct → {dest}")
    return build_atomically(dest, build)
