"""Shared tiny offline fixtures for the DriftCheck tests: a saved model, two LoRA adapters, a prompt file."""

from __future__ import annotations

import pytest
import torch

import tiny

from driftrows import ROWS, SAFE, UNSAFE, write_jsonl  # noqa: F401  (re-exported for the fixtures)


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
