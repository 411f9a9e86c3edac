"""Prompt rendering and batched greedy generation with the model as it is (active adapter included)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

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
            out += response_texts(tokenizer, gen[:, ids.shape[1]:].tolist(), eos)
    return out


def response_texts(tokenizer: Any, rows: list[list[int]], eos: list[int]) -> list[str]:
    """Each generated row cut before its first end-of-sequence id, decoded without special tokens, stripped."""
    out = []
    for row in rows:
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        out.append(tokenizer.decode(row[:cut], skip_special_tokens=True).strip())
    return out


@dataclass
class PromptPass:
    """One cached forward pass over left-padded prompts: what the margin and greedy generation both start from."""

    last_logits: torch.Tensor  # (b, V): the logits at each prompt's last position
    cache: Any  # the KV cache of the prompts (extended in place by whoever continues from it last)
    mask: torch.Tensor  # (b, T) attention mask
    pos: torch.Tensor  # (b, T) position ids


def prompt_pass(model: Any, prompts: list[list[int]], pad: int) -> Optional[PromptPass]:
    """The cached forward pass over `prompts` (token ids); None when the model gives no reusable KV cache."""
    ids, mask, pos = left_pad(prompts, pad, model_device(model))  # (b, T)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    if not callable(getattr(cache, "batch_repeat_interleave", None)):
        return None
    return PromptPass(out.logits[:, -1], cache, mask, pos)


# generation_config fields that make `generate` do more than take the argmax (logits processors, beams, assisted or
# cached-differently decoding), with the values that leave plain greedy decoding unchanged
_NEUTRAL = {
    "num_beams": (None, 1), "num_beam_groups": (None, 1), "penalty_alpha": (None,), "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,), "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,), "forced_eos_token_id": (None,),
    "forced_decoder_ids": (None,), "sequence_bias": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0),
    "exponential_decay_length_penalty": (None,), "stop_strings": (None,), "guidance_scale": (None, 1.0),
    "watermarking_config": (None,), "token_healing": (None, False), "prompt_lookup_num_tokens": (None,),
    "assistant_model": (None,), "cache_implementation": (None, "dynamic"),
}


def plain_greedy(model: Any) -> bool:
    """Whether `greedy_responses`' `generate` call is plain argmax decoding for this model: its generation_config
    (whose set fields `generate` adds to ours) asks for no penalty, suppression, forced token, beam or special cache.
    Only then does `greedy_continue` give the same answers."""
    config = getattr(model, "generation_config", None)
    return config is None or all(getattr(config, k, None) in ok for k, ok in _NEUTRAL.items())


def greedy_continue(model: Any, done: PromptPass, *, max_new_tokens: int, eos: list[int], pad: int) -> list[list[int]]:
    """Greedy continuation (token ids, at most `max_new_tokens`) of a prompt pass, extending its cache: the steps of
    `model.generate(do_sample=False)` for a `plain_greedy` model — the argmax of the float32 last logits, `pad` after
    a row's end of sequence, stop when every row has ended — without running the prompts through the model again."""
    b = done.mask.shape[0]
    stops = torch.tensor(eos or [-1], device=done.mask.device)
    token = done.last_logits.float().argmax(dim=-1)  # (b,)
    steps, ended = [token], torch.isin(token, stops)
    mask, pos, key = done.mask, done.pos[:, -1:], cache_kwarg(model)
    for _ in range(max_new_tokens - 1):
        if bool(ended.all()):
            break
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        pos = pos + 1
        logits = model(input_ids=token[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                       logits_to_keep=1, **{key: done.cache}).logits[:, -1]
        token = torch.where(ended, torch.full_like(token, pad), logits.float().argmax(dim=-1))
        steps.append(token)
        ended |= torch.isin(token, stops)
    return torch.stack(steps, dim=1).tolist()


def cache_kwarg(model: Any) -> str:
    """'cache' (transformers ≥ 5.2x) or 'past_key_values' (older): the forward argument taking the KV cache."""
    getter = getattr(model, "get_base_model", None)
    base = getter() if callable(getter) else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"
