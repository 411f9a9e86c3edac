"""Prompt rendering and batched greedy generation with the model as it is (active adapter included)."""

from __future__ import annotations

from typing import Any

import torch
from agl_core.batches import left_pad as core_left_pad
from agl_core.batches import model_device, pad_id, render_prompt


def check_chat_template(tokenizer: Any, use_chat_template: bool, model_name: str = "the model") -> None:
    """ValueError when prompts should go through a chat template and the tokenizer has none."""
    if use_chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer of {model_name} has no chat template, and DriftCheck renders every prompt as a user "
            "turn of the chat template (refusal behaviour depends on it). Use a chat/instruct model, add a "
            "chat_template to its tokenizer_config.json, or pass --no-chat-template (use_chat_template=False) "
            "to feed the raw prompt text."
        )


def render_all(tokenizer: Any, prompts: list[str], use_chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt as a user turn plus the generation prompt (or the raw text)."""
    return [render_prompt(tokenizer, p, use_chat_template) for p in prompts]


def left_pad(seqs: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(ids (B, T), attention mask (B, T), position ids (B, T)) with sequences aligned at the right end."""
    ids, mask = core_left_pad(seqs, pad, device)
    return ids, mask, (mask.cumsum(dim=1) - 1).clamp(min=0)


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every end-of-sequence id the tokenizer or the model's generation config declares."""
    ids = [getattr(tokenizer, "eos_token_id", None)]
    declared = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(declared) if isinstance(declared, (list, tuple)) else [declared]
    return sorted({i for i in ids if isinstance(i, int)})


def greedy_responses(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 48,
                     batch_size: int = 16, use_chat_template: bool = True) -> list[str]:
    """The decoded greedy continuation (at most `max_new_tokens`, cut at EOS) of each prompt, batched."""
    from transformers import GenerationConfig

    device, pad, eos = model_device(model), pad_id(tokenizer), eos_ids(model, tokenizer)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                              eos_token_id=eos or None)
    rendered = render_all(tokenizer, prompts, use_chat_template)
    out: list[str] = []
    with torch.no_grad():
        for start in range(0, len(rendered), batch_size):
            ids, mask, _ = left_pad(rendered[start:start + batch_size], pad, device)
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)  # (b, T + new)
            for row in gen[:, ids.shape[1]:].tolist():
                cut = next((i for i, t in enumerate(row) if t in eos), len(row))
                out.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return out
