"""The forgetting probe: the alignment loss (mean token NLL of fixed base-model targets) at log-spaced steps."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import numpy as np
import torch
from agl_core.batches import IGNORE, RecordBatches, make_batches, model_device, pad_id

GROUPS = ("unsafe", "safe")
METRIC_PREFIX = "agl/forget_"
MAX_LENGTH = 1024  # prompt + target tokens per example


def log_schedule(max_steps: int, points: int) -> list[int]:
    """Step 0 plus min(points − 1, max_steps) distinct integer steps log-spaced over [1, max_steps].

    Rounding a geometric sequence collides at small steps; collisions are pushed to the next free integer, so
    the schedule always holds 1 and max_steps and exactly the asked number of steps.
    """
    for name, value, lo in (("max_steps", max_steps, 0), ("points", points, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"log_schedule: {name}={value!r} is invalid: must be an integer ≥ {lo}.")
    want = min(points - 1, max_steps)
    if want == 0:
        return [0]
    ideal = np.geomspace(1, max_steps, want) if want > 1 else np.array([float(max_steps)])
    steps = [int(round(v)) for v in ideal]
    for i in range(1, want):  # strictly increasing from the left ...
        steps[i] = max(steps[i], steps[i - 1] + 1)
    steps[-1] = max_steps
    for i in range(want - 2, -1, -1):  # ... and no later than max_steps from the right
        steps[i] = min(steps[i], steps[i + 1] - 1)
    return [0] + steps


def summarize(labels: Iterable[str], nll: np.ndarray) -> dict[str, Optional[float]]:
    """{'unsafe_nll', 'safe_nll': mean per group (None when a group is empty), 'nll': mean of the group means}."""
    labels = np.asarray(list(labels))
    nll = np.asarray(nll, dtype=np.float64)
    out: dict[str, Optional[float]] = {}
    means = []
    for group in GROUPS:
        sel = labels == group
        value = float(nll[sel].mean()) if sel.any() else None
        out[f"{group}_nll"] = value
        if value is not None:
            means.append(value)
    out["nll"] = float(np.mean(means)) if means else None
    return out


def as_metrics(summary: dict[str, Optional[float]]) -> dict[str, float]:
    """agl/forget_nll, agl/forget_unsafe_nll, agl/forget_safe_nll (absent groups left out)."""
    return {METRIC_PREFIX + key: value for key, value in summary.items() if value is not None}


@dataclass
class ProbeSet:
    """Fixed probe examples: (prompt ids, target ids) per prompt, with their ids and labels."""

    ids: list[str]
    labels: list[str]
    prompt_ids: list[list[int]]
    target_ids: list[list[int]]

    def batches(self, batch_size: int, pad: int) -> RecordBatches:
        """Right-padded batches, labels only on the target tokens (no generation: every target is given)."""
        examples = list(zip(self.prompt_ids, self.target_ids))
        return RecordBatches(examples, batch_size=batch_size, max_length=MAX_LENGTH, pad=pad, model=None,
                             tokenizer=None, max_new_tokens=1)


def build_probe(model: Any, tokenizer: Any, records: list[dict], *, generate: str = "missing",
                max_new_tokens: int = 48, batch_size: int = 8, use_chat_template: bool = True,
                progress: bool = True) -> ProbeSet:
    """The probe of `records` ({id, label, prompt, response}): given responses are tokenized, the others (all
    of them with generate='all') are the base model's greedy answers (adapters disabled, eval mode)."""
    if generate not in ("missing", "all"):
        raise ValueError(f"forgetting targets={generate!r} is invalid: use 'missing' or 'all'.")
    rows = [{"prompt": r["prompt"], "response": r.get("response") or None} for r in records]
    batches = make_batches(rows, tokenizer, batch_size=batch_size, max_length=MAX_LENGTH, model=model,
                           max_new_tokens=max_new_tokens, generate=generate, use_chat_template=use_chat_template)
    todo = [i for i in range(len(batches))
            if any(t is None for _, t in batches.examples[i * batch_size:(i + 1) * batch_size])]
    if todo:
        from tqdm.auto import tqdm

        for i in tqdm(todo, desc="AGL forgetting: base-model targets", unit="batch", disable=not progress):
            batches[i]  # generates the batch's missing targets once and keeps them
    prompts, targets = zip(*batches.examples)
    for rec, p, t in zip(records, prompts, targets):
        if not t or len(p) >= MAX_LENGTH:
            raise ValueError(f"Forgetting prompt {rec['id']!r} leaves no target token to score (prompt of {len(p)} "
                             f"tokens, target of {len(t or [])}; limit {MAX_LENGTH}): shorten or drop it.")
    return ProbeSet([r["id"] for r in records], [r["label"] for r in records], [list(p) for p in prompts],
                    [list(t) for t in targets])


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the (base) model's forward takes `logits_to_keep` (project only the last positions to the vocabulary)."""
    getter = getattr(model, "get_base_model", None)
    base = getter() if callable(getter) else model
    try:
        return "logits_to_keep" in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def prompt_nll(model: torch.nn.Module, batches: Iterable[dict]) -> np.ndarray:
    """Mean token NLL of each example's labelled tokens under `model` as it is (adapters on), in eval mode and
    without gradients; every submodule's training flag is restored afterwards. Returns (examples,) float64.

    Only the positions from the batch's first labelled token on are projected to the vocabulary when the model
    takes `logits_to_keep` (the prompt positions before it predict nothing that is scored).
    """
    device = model_device(model)
    keep = _keeps_logits(model)
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    out: list[float] = []
    try:
        with torch.no_grad():
            for batch in batches:
                ids = batch["input_ids"].to(device)  # (b, T)
                mask = batch["attention_mask"].to(device)  # (b, T)
                labels = batch["labels"].to(device)  # (b, T)
                scored = (labels != IGNORE).any(dim=0).nonzero()
                start = max(int(scored[0]) - 1, 0) if keep and len(scored) else 0  # first predicting position
                extra = {"logits_to_keep": ids.shape[1] - start} if keep else {}
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
                logits = logits[:, -(ids.shape[1] - start):][:, :-1]  # (b, T-1-start, V): positions start..T-2
                target = labels[:, start + 1:]  # (b, T-1-start): the token each position predicts
                valid = target != IGNORE
                logp = torch.log_softmax(logits.float(), dim=-1)
                tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (b, T-1-start)
                nll = -(tok.double() * valid).sum(1) / valid.sum(1).clamp(min=1)
                out.extend(nll.tolist())
    finally:
        for module, training in modes:
            module.training = training
    return np.asarray(out, dtype=np.float64)


def measure(model: torch.nn.Module, probe: ProbeSet, tokenizer: Any, batch_size: int = 8) -> np.ndarray:
    """Per-prompt alignment loss of `probe` under `model` now: (prompts,) float64 (NaN where the model overflowed).

    Examples are batched by length (less padding) and returned in the probe's order.
    """
    order = sorted(range(len(probe.ids)), key=lambda i: len(probe.prompt_ids[i]) + len(probe.target_ids[i]))
    ranked = ProbeSet([probe.ids[i] for i in order], [probe.labels[i] for i in order],
                      [probe.prompt_ids[i] for i in order], [probe.target_ids[i] for i in order])
    nll = prompt_nll(model, ranked.batches(batch_size, pad_id(tokenizer)))
    out = np.empty_like(nll)
    out[order] = nll
    return out
