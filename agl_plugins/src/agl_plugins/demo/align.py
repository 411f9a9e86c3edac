"""The aligned base: SmolLM2-135M-Instruct with a refusal behaviour trained in (it refuses nothing out of the box).

Recipe (seeded, one thread): refuse the unsafe training prompts (alignment-v1 `fisher` split + Do-Not-Answer malicious
uses, written refusals), keep answering ordinary prompts as before (targets: the model's own greedy answers), one
LoRA adapter trained with the Hugging Face Trainer, then merged into the weights. The adapter is shipped in the
package (data/aligned-v1/) so users need not retrain it; `agl align-base` reproduces it.
"""

from __future__ import annotations

import hashlib
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
ROWS_FILE = "training_rows.jsonl"


def align_safe_prompts() -> list[str]:
    """Ordinary prompts whose own answers the aligned base keeps: alignment-v1 `fisher` safe + written benign."""
    rows = [r["prompt"] for r in alignment_v1().records("fisher") if r["label"] == "safe"]
    return rows + split_benign()["align"] + request_prompts()


def training_rows(model: Any, tokenizer: Any, progress: Callable[[str], None],
                  known: Optional[dict[str, str]] = None) -> list[dict]:
    """Refusal rows for unsafe prompts and the model's own greedy answers for safe ones, interleaved.

    known: answers already generated (prompt → answer), e.g. from an interrupted run; only the rest are generated.
    """
    unsafe = align_unsafe()
    safe = align_safe_prompts()
    check_disjoint([r["prompt"] for r in unsafe] + safe, [r["prompt"] for r in eval_records()], "alignment-training")
    answers = dict(known or {})
    todo = [p for p in safe if p not in answers]
    if todo:
        progress(f"aligned base: generating the model's own answers to {len(todo)} ordinary prompts")
        ids = generate_targets(model, tokenizer, todo, max_new_tokens=SAFE_NEW_TOKENS, batch_size=16)
        answers.update({p: tokenizer.decode(t, skip_special_tokens=True).strip() for p, t in zip(todo, ids)})
    safe_rows = [{"prompt": p, "response": answers[p], "label": "safe"} for p in safe if answers[p]]
    rows = []
    for i in range(max(len(unsafe), len(safe_rows))):
        rows += [unsafe[i]] if i < len(unsafe) else []
        rows += [safe_rows[i]] if i < len(safe_rows) else []
    return rows


def train_adapter(out: Path, progress: Callable[[str], None] = print, base: str = "smollm2-135m-instruct",
                  regenerate: bool = False) -> Path:
    """Train the alignment adapter from the packaged model and save it (PEFT folder + its training rows) into `out`.

    regenerate: generate every safe answer anew instead of reusing the shipped training rows' answers.
    """
    torch.manual_seed(SPEC.seed)
    model, tokenizer = load_model_and_tokenizer(base, progress=progress)
    tmp = out.with_name(out.name + ".work")
    cached = tmp / ROWS_FILE  # the generated answers survive an interrupted run
    # Answers already generated are reused: from an interrupted run, else (unless regenerate) the shipped rows —
    # 381 of their 597 safe answers were generated with 64 new tokens by an earlier setting, the rest with 48.
    previous = read_jsonl(cached) or ([] if regenerate else read_jsonl(ADAPTER_DIR / ROWS_FILE) or [])
    known = {r["prompt"]: r["response"] for r in previous if r["label"] == "safe"}
    rows = training_rows(model, tokenizer, progress, known)
    tmp.mkdir(parents=True, exist_ok=True)
    write_jsonl(cached, rows)
    progress(f"aligned base: LoRA r={SPEC.r} on {len(rows)} rows, {SPEC.epochs:g} epochs")
    peft_model, _ = lora_finetune(model, tokenizer, rows, SPEC, str(tmp))

    staged = out.with_name(out.name + ".new")
    shutil.rmtree(staged, ignore_errors=True)
    peft_model.save_pretrained(str(staged))
    to_bfloat16(staged / "adapter_model.safetensors")
    (staged / ROWS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
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


def to_bfloat16(path: Path) -> None:
    """Store the adapter weights in bfloat16 (half the size in the repository; merged into float32 weights)."""
    from safetensors.torch import load_file, save_file

    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def adapter_digest(adapter: Path) -> str:
    """First 12 hex digits of the SHA-256 of the adapter weights: names the merged model built from them."""
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"The aligned-base adapter is missing at {adapter}; rebuild it with "
                                f"`agl align-base --out {adapter}` (about 15 minutes on 2 CPU cores).")
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:12]


def aligned_base_dir(adapter: Optional[Path] = None) -> Path:
    """The cached merged model of `adapter` (default: the shipped one); a new adapter gets a new folder."""
    return cache_root() / "models" / f"{ALIGNED_NAME}-{adapter_digest(adapter or ADAPTER_DIR)}"


def ensure_aligned_base(progress: Callable[[str], None] = print, adapter: Optional[Path] = None) -> Path:
    """The aligned base as a plain HF folder (packaged model + shipped adapter, merged), built once and cached."""
    adapter = adapter or ADAPTER_DIR
    dest = aligned_base_dir(adapter)
    if is_complete(dest):
        return dest

    def build(folder: Path) -> None:
        from peft import PeftModel

        model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct", progress=progress)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        merged.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))

    progress(f"aligned base: merging {adapter.name} into SmolLM2-135M-Instruct → {dest}")
    return build_atomically(dest, build)
