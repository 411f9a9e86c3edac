"""The main job's stages as functions: Fisher statistics and masks on the aligned base, the two fine-tunes
(plain LoRA and LoRA + AGL, identical but for AGL), and their evaluation."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from agl_core.batches import make_batches
from agl_core.config import AGLConfig
from agl_core.fisher import estimate_fisher, estimate_input_covariance, estimate_kfac
from agl_core.mask import FisherMask
from agl_core.safeio import atomic_write_bytes

from ..forgetting import FORGET_FILE
from ..prompts import alignment_v1
from .data import split_benign
from .train import FinetuneSpec, lora_finetune, mean_nll


def fisher_records() -> list[dict]:
    """Alignment data for the Fisher: alignment-v1 `fisher` split (written refusals; safe targets generated)."""
    return [{"prompt": r["prompt"], "response": r["response"] or None, "label": r["label"]}
            for r in alignment_v1().records("fisher")]


@dataclass
class FisherStats:
    """Everything the masks of every basis are built from, estimated once on the aligned base."""

    diagonal: Optional[dict] = None
    kfac: Optional[dict] = None
    reference: Optional[dict] = None
    seconds: dict = field(default_factory=dict)


def estimate_stats(model: Any, tokenizer: Any, targets: list[str], *, kinds: tuple[str, ...] = ("diagonal",),
                   batch_size: int = 8, max_length: int = 192, max_new_tokens: int = 48,
                   progress: bool = True, max_examples: Optional[int] = None,
                   labels: tuple[str, ...] = ("unsafe", "safe"), targets_cache: Optional[Path] = None) -> FisherStats:
    """Diagonal Fisher and/or K-FAC statistics on the alignment data (its rows of the given labels), plus the benign
    reference covariance. The batches and `targets_cache` are those of `fisher_batches`."""
    stats = FisherStats()
    t0 = time.perf_counter()
    batches = fisher_batches(model, tokenizer, batch_size=batch_size, max_length=max_length,
                             max_new_tokens=max_new_tokens, max_examples=max_examples, labels=labels,
                             targets_cache=targets_cache)
    common = dict(target_modules=list(targets), progress=progress)
    if "diagonal" in kinds:
        stats.diagonal = estimate_fisher(model, batches, **common)
    if "kfac" in kinds or "contrastive" in kinds:
        stats.kfac = estimate_kfac(model, batches, **common)
    if "contrastive" in kinds:
        ref = [{"prompt": p, "response": ""} for p in split_benign()["task"][:max_examples]]
        ref_batches = make_batches(ref, tokenizer, batch_size=batch_size, max_length=max_length)
        stats.reference = estimate_input_covariance(model, ref_batches, **common)
    stats.seconds["fisher"] = time.perf_counter() - t0
    return stats


def fisher_batches(model: Any, tokenizer: Any, *, batch_size: int = 8, max_length: int = 192, max_new_tokens: int = 48,
                   max_examples: Optional[int] = None, labels: tuple[str, ...] = ("unsafe", "safe"),
                   targets_cache: Optional[Path] = None) -> Any:
    """Token batches of the alignment data's rows of the given labels, every target filled in: the written refusals,
    and the model's greedy answers to the safe prompts.

    targets_cache: a folder (one per base model: `targets_cache_dir`) keeping those generated answers, which are
    otherwise generated anew each time (a minute on one CPU core for the 59 safe rows)."""
    if not labels or set(labels) - {"unsafe", "safe"}:
        raise ValueError(f"labels={labels!r}: choose one or both of 'unsafe' and 'safe'.")
    rows = [r for r in fisher_records() if r["label"] in labels]
    if max_examples and len(labels) == 1:
        rows = rows[:max_examples]
    elif max_examples:  # keep both labels: alternate unsafe and safe rows
        unsafe, safe = [r for r in rows if r["label"] == "unsafe"], [r for r in rows if r["label"] == "safe"]
        rows = [r for pair in zip(unsafe, safe) for r in pair][:max_examples]
    batches = make_batches([{"prompt": r["prompt"], "response": r["response"]} for r in rows], tokenizer,
                           batch_size=batch_size, max_length=max_length, model=model, max_new_tokens=max_new_tokens)
    cached = Path(targets_cache) / f"{_targets_key(batches.examples, batch_size, max_length, max_new_tokens)}.json" \
        if targets_cache is not None else None
    if not _fill_cached_targets(batches.examples, cached):
        for i in range(len(batches)):  # generate batch by batch, as a lazy pass would (same padding, same answers)
            batches[i]
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(cached, json.dumps([t for _, t in batches.examples]).encode("utf-8"))
    return batches


def targets_cache_dir(base_dir: Path) -> Path:
    """Where the Fisher data's generated answers of the base model in `base_dir` are kept (next to its folder)."""
    return base_dir.parent / f"{base_dir.name}-fisher-targets"


def _targets_key(examples: list[tuple[list[int], Optional[list[int]]]], batch_size: int, max_length: int,
                 max_new_tokens: int) -> str:
    """Names everything the generated answers depend on besides the model: the token ids of every example (the
    given answers included), and the batching (a row's padding), length and generation settings."""
    blob = json.dumps([examples, batch_size, max_length, max_new_tokens], separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _fill_cached_targets(examples: list[tuple[list[int], Optional[list[int]]]], path: Optional[Path]) -> bool:
    """Fill the examples' missing answers from `path`; False (nothing changed) if it is absent or unreadable."""
    if path is None or not path.is_file():
        return False
    try:
        targets = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (isinstance(targets, list) and len(targets) == len(examples) and all(
            isinstance(t, list) and all(isinstance(i, int) for i in t) for t in targets)):
        return False  # not written by this function: generate again (and overwrite it)
    for i, ((prompt, target), kept) in enumerate(zip(examples, targets)):
        if target is None:
            examples[i] = (prompt, kept)
    return True


def build_mask(stats: FisherStats, config: AGLConfig, model: Any, out: Path, *, contrastive: bool = False) -> Path:
    """Select the support for `config` from the estimated statistics and save it (atomically) under `out`."""
    if config.basis == "coordinate":
        mask = FisherMask.from_fisher(stats.diagonal, config, model=model, metadata={"created_by": "agl demo"})
    else:
        mask = FisherMask.from_fisher(stats.kfac, config, model=model, reference=stats.reference if contrastive else None,
                                      metadata={"created_by": "agl demo"})
    return Path(mask.save(str(out)))


@dataclass
class RunResult:
    name: str
    adapter: str
    task_loss: float
    train_loss: Optional[float]
    seconds: float
    agl: Optional[dict] = None
    last_metrics: dict = field(default_factory=dict)
    forgetting: Optional[str] = None  # the forgetting probe's rows, when the run measured them


def finetune(base_dir: str, rows: list[dict], heldout: list[dict], spec: FinetuneSpec, out: Path, name: str,
             *, progress: bool = True, step_log: Optional[Callable[[str], None]] = None) -> RunResult:
    """One fine-tune from a fresh copy of the aligned base; saves the adapter under out/name, measures task loss."""
    from ..models import load_model_and_tokenizer

    t0 = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(base_dir, progress=lambda s: None)
    peft_model, history = lora_finetune(model, tokenizer, rows, spec, str(out / f"{name}.trainer"), progress=progress,
                                        step_log=step_log)
    task_loss = mean_nll(peft_model, tokenizer, heldout)
    adapter = out / name
    peft_model.save_pretrained(str(adapter))
    train = [h["loss"] for h in history if "loss" in h]
    agl = [h for h in history if any(k.startswith("agl/") for k in h)]
    probe = out / f"{name}.trainer" / FORGET_FILE
    return RunResult(name, str(adapter), task_loss, train[-1] if train else None, time.perf_counter() - t0,
                     spec.agl.to_dict() if spec.agl is not None else None,
                     {k: v for k, v in (agl[-1] if agl else {}).items() if k.startswith("agl/")},
                     str(probe) if probe.exists() else None)


def load_adapter(base_dir: str, adapter: str) -> Any:
    """A fresh copy of the aligned base with a saved LoRA adapter on it, in eval mode (to judge the adapter)."""
    from peft import PeftModel

    from ..models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(str(base_dir), progress=lambda s: None)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


EVAL_NEW_TOKENS = 24  # greedy tokens judged per answer: refusals open the answer


def refusal_rates(model: Any, tokenizer: Any, records: list[dict], *, max_new_tokens: int = EVAL_NEW_TOKENS,
                  batch_size: int = 32) -> dict[str, Any]:
    """Pattern-judged refusal rate on the unsafe and the safe records (greedy answers), with per-prompt scores."""
    from ..drift.generation import greedy_responses
    from ..drift.patterns import refusal_score

    responses = greedy_responses(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size)
    scores = [refusal_score(x) for x in responses]
    out: dict[str, Any] = {"scores": scores, "responses": responses}
    for label in ("unsafe", "safe"):
        picked = [s for s, r in zip(scores, records) if r["label"] == label]
        out[label] = sum(picked) / len(picked) if picked else None
    return out
