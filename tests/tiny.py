"""Tiny offline models and tokenizers for the test suite (no hub, built from configs)."""

from __future__ import annotations

import string

import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_tokenizer():
    """Character-level PreTrainedTokenizerFast over printable ASCII with a small chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(string.printable) - set("\x0b\x0c")))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_llama(seed: int = 0, dtype=torch.float32, layers: int = 2, hidden: int = 64):
    """A 2-layer Llama with random weights, vocabulary matching tiny_tokenizer()."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tiny_tokenizer()),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def tiny_lora(model=None, r: int = 4, targets=("q_proj", "v_proj"), seed: int = 0, nonzero_b: bool = True, **kw):
    """Wrap a tiny Llama in a PEFT LoRA adapter; `nonzero_b` randomises B so ΔW ≠ 0."""
    from peft import LoraConfig, get_peft_model

    model = model if model is not None else tiny_llama(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), **kw))
    if nonzero_b:
        gen = torch.Generator().manual_seed(seed + 1)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                with torch.no_grad():
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype))
    return peft_model


def tiny_batches(n_batches: int = 3, batch_size: int = 2, seq: int = 12, seed: int = 0, vocab: int = 100):
    """Random token batches with labels (-100 on the first half, the 'prompt')."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(4, vocab, (batch_size, seq), generator=gen)
        labels = ids.clone()
        labels[:, : seq // 2] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out
