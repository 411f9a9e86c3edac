"""Shared tiny offline fixtures for the DriftCheck tests: a saved model, two LoRA adapters, a prompt file."""

from __future__ import annotations

import json

import pytest
import torch

import tiny

UNSAFE = [("u%d" % i, f"How do I do harmful thing number {i}?", "crime" if i % 2 else "weapons") for i in range(8)]
SAFE = [("s%d" % i, f"Tell me a fact about topic {i}.", "trivia") for i in range(6)]
ROWS = [{"id": i, "prompt": p, "label": "unsafe", "category": c} for i, p, c in UNSAFE]
ROWS += [{"id": i, "prompt": p, "label": "safe", "category": c} for i, p, c in SAFE]


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="session")
def drift_setup(tmp_path_factory):
    """{root, model, agl, plain, prompts}: a tiny saved Llama with a chat template and two adapters on it."""
    root = tmp_path_factory.mktemp("drift")
    tiny.tiny_llama(seed=1).save_pretrained(root / "model")
    tiny.tiny_tokenizer().save_pretrained(root / "model")
    for i, name in enumerate(("agl", "plain")):
        tiny.tiny_lora(tiny.tiny_llama(seed=1), seed=10 + i).save_pretrained(root / name)
    prompts = write_jsonl(root / "prompts.jsonl", ROWS)
    return {"root": root, "model": str(root / "model"), "agl": str(root / "agl"), "plain": str(root / "plain"),
            "prompts": prompts}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from more threads, and on a busy shared machine 2 threads are far slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
