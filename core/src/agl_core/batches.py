"""Alignment batches: validated token batches, batches from prompt/response records, greedy self-targets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Iterable, Optional

import torch
from torch import nn

from .hooks import base_model_mode

IGNORE = -100
GENERATE_MODES = ("missing", "all", "never")


def to_batch(batch: Any, index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch dict → (input_ids (B, T) long, attention_mask (B, T) bool, labels (B, T) long) on `device`.

    Missing attention_mask = all ones; missing labels = every non-padding token; labels on padding → -100.
    """
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        got = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"Batch {index} has no 'input_ids' (got {got}). Each batch must be a dict with 'input_ids' and "
            "optionally 'attention_mask' and 'labels'; to use prompt/response records pass tokenizer= "
            "(or build batches with make_batches)."
        )
    ids = _as_2d(batch["input_ids"], "input_ids", index, device)
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else _as_2d(mask, "attention_mask", index, device)
    labels = batch.get("labels")
    labels = ids.clone() if labels is None else _as_2d(labels, "labels", index, device)
    for key, t in (("attention_mask", mask), ("labels", labels)):
        if t.shape != ids.shape:
            raise ValueError(
                f"Batch {index}: '{key}' has shape {tuple(t.shape)} but 'input_ids' has {tuple(ids.shape)}; "
                "they must match token for token."
            )
    mask = mask.bool()
    return ids, mask, labels.masked_fill(~mask, IGNORE)


def _as_2d(value: Any, key: str, index: int, device: torch.device) -> torch.Tensor:
    t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    if t.is_floating_point() or t.is_complex():
        raise ValueError(f"Batch {index}: '{key}' must hold integer token ids / flags, got dtype {t.dtype}.")
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.numel() == 0:
        raise ValueError(
            f"Batch {index}: '{key}' must be a non-empty (batch, seq) tensor or a list of ids, "
            f"got shape {tuple(t.shape)}."
        )
    return t.to(device=device, dtype=torch.long)


def check_token_range(ids: torch.Tensor, labels: torch.Tensor, vocab: Optional[int], index: int) -> None:
    """ValueError if a token id or label lies outside [0, vocab) (labels may also be -100)."""
    if vocab is None:
        return
    bad_label = (labels != IGNORE) & ((labels < 0) | (labels >= vocab))
    lo, hi, n_bad = torch.stack([ids.min(), ids.max(), bad_label.sum()]).tolist()
    if lo < 0 or hi >= vocab or n_bad:
        raise ValueError(
            f"Batch {index} has token ids in [{lo}, {hi}] and {n_bad} out-of-range labels, but the model's "
            f"vocabulary has {vocab} entries; tokenize with the model's own tokenizer (labels: ids or -100)."
        )


def pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def render_prompt(tokenizer: Any, prompt: str, use_chat_template: bool = True) -> list[int]:
    """Prompt token ids: a user turn + generation prompt via the chat template when there is one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Response ids, ending with the end-of-sequence token when the tokenizer has one."""
    ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
    eos = getattr(tokenizer, "eos_token_id", None)
    return ids + [eos] if isinstance(eos, int) else ids


def _records(records: Any, prompt_field: str, response_field: str) -> list[tuple[str, Optional[str]]]:
    """(prompt, response or None) per record; a record is a dict (or a bare prompt string)."""
    out = []
    for i, rec in enumerate(records):
        if isinstance(rec, str):
            out.append((rec, None))
            continue
        if not isinstance(rec, Mapping) or not isinstance(rec.get(prompt_field), str):
            raise ValueError(
                f"Record {i} has no string field {prompt_field!r} (got {rec!r:.120}); each record needs a prompt "
                f"(set prompt_field= to the column that holds it)."
            )
        response = rec.get(response_field)
        out.append((rec[prompt_field], response if isinstance(response, str) else None))
    if not out:
        raise ValueError("No records given: pass at least one prompt (records with a 'prompt' field or strings).")
    return out


def _eos_ids(model: Optional[nn.Module], tokenizer: Any) -> set[int]:
    ids = {getattr(tokenizer, "eos_token_id", None)}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return {i for i in ids if isinstance(i, int)}


def left_pad(seqs: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T), attention mask (B, T)) with the sequences aligned at the right end (for generation)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def generate_ids(model: nn.Module, tokenizer: Any, prompts: list[list[int]], *, max_new_tokens: int = 32,
                 batch_size: int = 8) -> list[list[int]]:
    """Greedy continuations (adapters disabled, eval mode) of tokenized prompts, cut after the first EOS."""
    device = model_device(model)
    eos, pad = _eos_ids(model, tokenizer), pad_id(tokenizer)
    out: list[list[int]] = []
    with base_model_mode(model), torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ids, mask = left_pad(chunk, pad, device)
            gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)  # (b, width + new)
            for row in gen[:, ids.shape[1]:].tolist():
                cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                out.append(row[:cut])
    return out


def generate_targets(model: nn.Module, tokenizer: Any, records: Iterable[Any], *, max_new_tokens: int = 32,
                     batch_size: int = 8, prompt_field: str = "prompt",
                     use_chat_template: bool = True) -> list[list[int]]:
    """The base model's own greedy answer (token ids, EOS included if produced) to each record's prompt."""
    prompts = [render_prompt(tokenizer, p, use_chat_template) for p, _ in _records(records, prompt_field, "")]
    return generate_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


def model_device(model: nn.Module) -> torch.device:
    """Where inputs go: the input embedding's device, else the first parameter's, else CPU."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embed = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        embed = None
    for p in (embed.parameters() if embed is not None else model.parameters()):
        return p.device
    return torch.device("cpu")


def pad_examples(examples: list[tuple[list[int], list[int]]], pad: int, max_length: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of (prompt ids, response ids) pairs, each cut to `max_length`: input_ids,
    attention_mask and labels ((b, T) tensors; labels are IGNORE outside the response)."""
    seqs = [(p + t)[:max_length] for p, t in examples]
    labs = [([IGNORE] * len(p) + t)[:max_length] for p, t in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, (s, lab) in enumerate(zip(seqs, labs)):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        labels[row, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        mask[row, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class RecordBatches(Sequence):
    """Right-padded token batches built from records; missing targets are generated on first access.

    Lazy so that under torch.distributed each rank only generates targets for the batches of its shard.
    Item i is a dict of (b, T) tensors: input_ids, attention_mask, labels (-100 outside the response).
    """

    def __init__(self, examples: list[tuple[list[int], Optional[list[int]]]], *, batch_size: int, max_length: int,
                 pad: int, model: Optional[nn.Module], tokenizer: Any, max_new_tokens: int) -> None:
        self.examples = examples  # (prompt ids, response ids or None = to generate)
        self.batch_size, self.max_length, self.pad = batch_size, max_length, pad
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not isinstance(i, int):
            raise TypeError(f"RecordBatches indices must be integers, got {type(i).__name__}.")
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"batch index {i} out of range for {len(self)} batches")
        rows = list(range(i * self.batch_size, min((i + 1) * self.batch_size, len(self.examples))))
        self._fill_targets(rows)
        return pad_examples([self.examples[r] for r in rows], self.pad, self.max_length)

    def _fill_targets(self, rows: list[int]) -> None:
        todo = [r for r in rows if self.examples[r][1] is None and len(self.examples[r][0]) < self.max_length]
        for r in rows:
            if self.examples[r][1] is None and r not in todo:
                self.examples[r] = (self.examples[r][0], [])  # prompt fills max_length: nothing to predict
        if not todo:
            return
        prompts = [self.examples[r][0] for r in todo]
        generated = generate_ids(self.model, self.tokenizer, prompts, max_new_tokens=self.max_new_tokens,
                                 batch_size=len(prompts))
        for r, target in zip(todo, generated):
            self.examples[r] = (self.examples[r][0], target)


def make_batches(records: Iterable[Any], tokenizer: Any, *, batch_size: int = 8, max_length: int = 256,
                 prompt_field: str = "prompt", response_field: str = "response", use_chat_template: bool = True,
                 model: Optional[nn.Module] = None, max_new_tokens: int = 32,
                 generate: str = "missing") -> RecordBatches:
    """Token batches from records (dicts with a prompt and optional response, or prompt strings).

    The prompt is a user turn rendered with the tokenizer's chat template (plus the generation prompt) when it
    has one; labels cover only the response tokens (+ EOS). generate='missing' (default) answers records
    without a response with the base model's own greedy output (`model=` required, `max_new_tokens` long,
    adapters disabled), 'all' does so for every record, 'never' leaves them prompt-only (no target tokens:
    enough for forward-only statistics such as `estimate_input_covariance`).
    Sequences longer than `max_length` are cut at the end. The tokenizer is duck-typed (HF-like).
    """
    limits = (("batch_size", batch_size, 1), ("max_length", max_length, 2), ("max_new_tokens", max_new_tokens, 1))
    for key, value, lo in limits:
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"make_batches: {key}={value!r} is invalid: must be an integer ≥ {lo}.")
    if generate not in GENERATE_MODES:
        raise ValueError(f"make_batches: generate={generate!r} is invalid: must be one of {list(GENERATE_MODES)}.")
    pairs = _records(records, prompt_field, response_field)
    examples = []
    for i, (prompt, response) in enumerate(pairs):
        if generate == "all":
            response = None
        if response is None and generate != "never" and model is None:
            raise ValueError(
                f"Record {i} has no {response_field!r} text; pass model= to make_batches so the base model's "
                "greedy answer becomes the target, give every record a response, or pass generate='never' "
                "for prompt-only batches (forward-only statistics)."
            )
        if response is None:
            target = [] if generate == "never" else None
        else:
            target = encode_response(tokenizer, response)
        examples.append((render_prompt(tokenizer, prompt, use_chat_template), target))
    return RecordBatches(examples, batch_size=batch_size, max_length=max_length, pad=pad_id(tokenizer),
                         model=model, tokenizer=tokenizer, max_new_tokens=max_new_tokens)


def _first(data: Any) -> tuple[Any, Any]:
    """(first item or None, data with nothing consumed)."""
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return (data[0] if len(data) else None), data
    it = iter(data)
    first = next(it, None)
    return first, ([] if first is None else _chain(first, it))


def _chain(first: Any, rest: Iterable[Any]) -> Iterable[Any]:
    yield first
    yield from rest


def as_batches(data: Any, *, tokenizer: Any = None, model: Optional[nn.Module] = None,
               options: Optional[dict[str, Any]] = None) -> Any:
    """Token batches as given, one dict as [dict], or records (with `tokenizer`) through make_batches."""
    if isinstance(data, Mapping):
        return [data]
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise ValueError(
            f"batches must be an iterable of batch dicts (or records with tokenizer=), got {type(data).__name__}."
        )
    if isinstance(data, RecordBatches):
        return data
    first, data = _first(data)
    is_record = isinstance(first, str) or (isinstance(first, Mapping) and "input_ids" not in first)
    if is_record and tokenizer is not None:
        return make_batches(data, tokenizer, model=model, **(options or {}))
    if isinstance(first, str):
        raise ValueError("Got prompt strings instead of token batches: pass tokenizer= so they can be tokenized.")
    return data
