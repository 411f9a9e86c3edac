"""FisherMask files: safetensors round trip, refusals of bad files, fingerprints, atomic writes under SIGKILL."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from agl_core import maskio
from agl_core.blocks import CoordinateBlock, KFACStats
from agl_core.config import AGLConfig
from agl_core.fingerprint import model_fingerprint
from agl_core.mask import FisherMask
from agl_core.modules import find_linear_modules
from agl_core.safeio import TMP_SUFFIX, atomic_write, atomic_write_bytes, clean_stale_temps

HERE = Path(__file__).parent
META = {"estimator": "token", "data": {"prompts": ["sha:ab12", "sha:cd34"], "source": "builtin:alignment-v1"}}


def coordinate_mask():
    gen = torch.Generator().manual_seed(0)
    fisher = {
        "model.layers.0.self_attn.q_proj": torch.rand(12, 10, generator=gen),
        "model.layers.1.mlp.down_proj": torch.rand(10, 20, generator=gen),
        "model.layers.1.mlp.up_proj": torch.zeros(20, 10),
    }
    return FisherMask.from_fisher(fisher, AGLConfig(rho=0.1, lambda_a=2.5), metadata=META)


def kfac_mask(k_out="3"):
    gen = torch.Generator().manual_seed(1)
    data = {}
    for name, (n_out, n_in) in {"model.layers.0.self_attn.v_proj": (6, 8), "model.layers.0.mlp.gate_proj": (5, 8)}.items():
        x, g = torch.randn(30, n_in, generator=gen), torch.randn(30, n_out, generator=gen)
        data[name] = KFACStats(x.T @ x, g.T @ g, 30)
    return FisherMask.from_fisher(data, AGLConfig(basis="kfac", k_in=3, k_out=k_out), metadata=META)


def assert_same(a: FisherMask, b: FisherMask):
    assert a.config == b.config and a.metadata == b.metadata and list(a.blocks) == list(b.blocks)
    for name, block in a.blocks.items():
        other = b.blocks[name]
        assert type(other) is type(block) and other.shape == block.shape
        assert other.norm == block.norm and other.kappa == block.kappa
        fields = ("index", "fisher") if isinstance(block, CoordinateBlock) else ("U", "V", "mu", "lam")
        for f in fields:
            x, y = getattr(block, f), getattr(other, f)
            assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y))


@pytest.mark.parametrize("make", [coordinate_mask, kfac_mask, lambda: kfac_mask("all")], ids=["coord", "kfac", "kfac-all"])
def test_round_trip(tmp_path, make):
    mask = make()
    path = mask.save(tmp_path / "m.safetensors")
    assert path == str(tmp_path / "m.safetensors")
    loaded = FisherMask.load(path)
    assert_same(mask, loaded)
    assert loaded.identity() == mask.identity()
    with safe_open(path, framework="pt") as fh:  # a plain, valid safetensors file
        header = fh.metadata()
        keys = set(fh.keys())
    assert header["agl_format"] == "agl-mask" and header["format_version"] == "1"
    meta = json.loads(header["meta"])
    assert meta["metadata"] == mask.metadata and META.items() <= mask.metadata.items()
    assert meta["config"]["rho"] == mask.config.rho
    assert len(meta["content_sha256"]) == 64 and meta["created_at"] and meta["agl_core_version"]
    for name, block in mask.blocks.items():
        assert meta["modules"][name]["shape"] == list(block.shape)
    assert keys == set(mask.state_dict()["tensors"])


def test_file_info_without_tensors(tmp_path):
    mask = kfac_mask()
    path = mask.save(tmp_path)
    info = FisherMask.file_info(tmp_path)
    assert info["path"] == path and info["file_bytes"] == os.path.getsize(path)
    assert info["config"]["basis"] == "kfac" and info["metadata"]["estimator"] == "token"
    assert list(info["modules"]) == list(mask.blocks) and info["content_sha256"][:16] == mask.identity()


def test_tensor_names_and_empty_modules(tmp_path):
    mask = coordinate_mask()
    path = mask.save(tmp_path)
    with safe_open(path, framework="pt") as fh:
        keys = set(fh.keys())
    assert "model.layers.0.self_attn.q_proj::index" in keys and "model.layers.1.mlp.down_proj::fisher" in keys
    assert FisherMask.load(path).metadata["empty_modules"] == {"model.layers.1.mlp.up_proj": [20, 10]}
    none_u = kfac_mask("all")
    with safe_open(none_u.save(tmp_path / "k.safetensors"), framework="pt") as fh:
        assert not any(k.endswith("::U") for k in fh.keys()) and any(k.endswith("::mu") for k in fh.keys())


def test_folder_path(tmp_path):
    mask = coordinate_mask()
    folder = tmp_path / "new" / "mask_dir"
    path = mask.save(folder)
    assert path == str(folder / "mask.safetensors") and os.path.isfile(path)
    assert_same(mask, FisherMask.load(folder))
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # the user's usual mode, not mkstemp's 0600
    (tmp_path / "plainfile").write_text("x")
    with pytest.raises(ValueError, match="without the .safetensors suffix"):
        mask.save(tmp_path / "plainfile")


def test_missing_file_says_how_to_create(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*agl fisher"):
        FisherMask.load(tmp_path / "nothing")


def test_edited_tensor_bytes_refused(tmp_path):
    path = coordinate_mask().save(tmp_path / "m.safetensors")
    data = bytearray(Path(path).read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's bytes; header untouched
    Path(path).write_bytes(bytes(data))
    with pytest.raises(ValueError, match="Content hash mismatch"):
        FisherMask.load(path)


def test_truncated_file_refused(tmp_path):
    path = coordinate_mask().save(tmp_path / "m.safetensors")
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-40])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        FisherMask.load(path)


@pytest.mark.parametrize("payload", [pickle.dumps({"index": [1, 2]}), b"", b"hello world, not a mask" * 10])
def test_pickle_and_garbage_refused(tmp_path, payload):
    path = tmp_path / "m.safetensors"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        FisherMask.load(path)


def test_non_mask_safetensors_refused(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an AGL mask"):
        FisherMask.load(path)


def _rewrite(path, tensors=None, header_update=None, meta_update=None):
    """Rewrite a mask file with changed tensors/header; the content hash is recomputed to stay consistent."""
    with safe_open(str(path), framework="pt") as fh:
        header = dict(fh.metadata())
        tensors = tensors if tensors is not None else {k: fh.get_tensor(k) for k in fh.keys()}
    meta = json.loads(header["meta"])
    for key in ("content_sha256", "created_at", "agl_core_version"):
        meta.pop(key)
    meta.update(meta_update or {})
    meta["content_sha256"] = maskio.content_hash(tensors, meta)
    header.update({"meta": json.dumps(meta)}, **(header_update or {}))
    save_file(tensors, str(path), metadata=header)


def test_unknown_format_version_refused(tmp_path):
    path = coordinate_mask().save(tmp_path / "m.safetensors")
    _rewrite(path, header_update={"format_version": "7"})
    with pytest.raises(ValueError, match="format_version '7'.*reads format_version 1"):
        FisherMask.load(path)


def test_edited_meta_refused(tmp_path):
    path = coordinate_mask().save(tmp_path / "m.safetensors")
    with safe_open(path, framework="pt") as fh:
        header, tensors = dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}
    meta = json.loads(header["meta"])
    meta["config"]["rho"] = 0.5  # hash left as it was
    save_file(tensors, path, metadata=dict(header, meta=json.dumps(meta)))
    with pytest.raises(ValueError, match="Content hash mismatch"):
        FisherMask.load(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t, n: t.__setitem__(f"{n}::index", t[f"{n}::index"] + 10_000), "out of range"),
        (lambda t, n: t.__setitem__(f"{n}::index", t[f"{n}::index"].flip(0)), "not sorted"),
        (lambda t, n: t.__setitem__(f"{n}::fisher", t[f"{n}::fisher"][:-1]), "must be equal"),
        (lambda t, n: t.__setitem__(f"{n}::index", t[f"{n}::index"].long()), "int32"),
        (lambda t, n: t.pop(f"{n}::fisher"), "missing"),
        (lambda t, n: t.__setitem__("stray::index", torch.zeros(1, dtype=torch.int32)), "belong to no module"),
    ],
)
def test_inconsistent_blocks_refused(tmp_path, edit, match):
    mask = coordinate_mask()
    path = mask.save(tmp_path / "m.safetensors")
    tensors = dict(mask.state_dict()["tensors"])
    edit(tensors, "model.layers.0.self_attn.q_proj")
    _rewrite(path, tensors=tensors)
    with pytest.raises(ValueError, match=f"Inconsistent mask.*{match}"):
        FisherMask.load(path)


def test_inconsistent_kfac_block_refused(tmp_path):
    mask = kfac_mask()
    state = mask.state_dict()
    state["tensors"]["model.layers.0.mlp.gate_proj::V"] = torch.zeros(7, 3)
    with pytest.raises(ValueError, match="Inconsistent mask.*V is"):
        FisherMask.from_state_dict(state)
    state = mask.state_dict()
    state["meta"]["modules"]["model.layers.0.mlp.gate_proj"]["kappa"] = -1.0
    with pytest.raises(ValueError, match="kappa"):
        FisherMask.from_state_dict(state)


def test_non_json_metadata_refused(tmp_path):
    mask = coordinate_mask()
    mask.metadata["tensor"] = torch.ones(2)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        mask.save(tmp_path)


# ----- fingerprint -----


@pytest.fixture(scope="module")
def models():
    import tiny

    plain = tiny.tiny_llama(seed=0)
    short = tiny.tiny_llama(seed=0, layers=1)
    short.load_state_dict(plain.state_dict(), strict=False)  # same weights, one layer fewer
    return {
        "plain": plain,
        "bf16": tiny.tiny_llama(seed=0, dtype=torch.bfloat16),
        "peft": tiny.tiny_lora(tiny.tiny_llama(seed=0)),
        "other": tiny.tiny_llama(seed=1),
        "short": short,
    }


def test_fingerprint_plain_peft_bf16_agree(models):
    fp = model_fingerprint(models["plain"])
    assert len(fp["modules"]) == 14 and fp["modules"]["model.layers.0.mlp.up_proj"] == [128, 64]
    assert model_fingerprint(models["peft"]) == fp
    assert model_fingerprint(models["bf16"]) == fp
    other = model_fingerprint(models["other"])
    assert other["modules"] == fp["modules"] and not set(other["weights"].values()) & set(fp["weights"].values())


def test_fingerprint_names_and_speed(models):
    names = ["model.layers.1.self_attn.o_proj", "lm_head", "model.layers.9.mlp.up_proj"]
    fp = model_fingerprint(models["plain"], names)
    assert list(fp["modules"]) == names[:2]  # lm_head only when named; unknown names left out
    start = time.perf_counter()
    model_fingerprint(models["peft"])
    assert time.perf_counter() - start < 1.0


def test_quantised_weights_hash_raw_bytes_and_compare_by_shape():
    float_model = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    quant = torch.nn.Sequential(torch.nn.Linear(6, 4, bias=False))
    quant[0].weight = torch.nn.Parameter(torch.randint(-8, 8, (4, 6), dtype=torch.int8), requires_grad=False)
    fp_q = model_fingerprint(quant)
    assert fp_q["weights"]["0"].startswith("raw:") and fp_q["modules"]["0"] == [4, 6]
    mask = FisherMask.from_fisher({"0": torch.rand(4, 6)}, AGLConfig(rho=0.5), model=float_model)
    with pytest.warns(UserWarning, match="quantised on one side"):
        mask.check_model(quant)  # same shapes; hashes of float and raw weights are not comparable


def _mask_for(model):
    fisher = {n: torch.rand(m.weight.shape) for n, m in find_linear_modules(model).items()}  # (out, in) each
    return FisherMask.from_fisher(fisher, AGLConfig(rho=0.05), model=model)


def test_check_model(models, tmp_path):
    mask = FisherMask.load(_mask_for(models["plain"]).save(tmp_path))
    assert set(mask.metadata["fingerprint"]["modules"]) == set(mask.covered_modules())
    mask.check_model(models["plain"])
    mask.check_model(models["peft"])
    mask.check_model(models["bf16"])
    with pytest.raises(ValueError, match="different base model: 14 of 14 modules differ.*weights differ"):
        mask.check_model(models["other"])
    with pytest.raises(ValueError, match=r"7 of 14 modules differ \(7 missing\).*missing in the model"):
        mask.check_model(models["short"])
    bare = FisherMask(mask.blocks, mask.config, {})
    with pytest.warns(UserWarning, match="no base-model fingerprint"):
        bare.check_model(models["plain"])


# ----- atomic writes -----


def test_failed_write_keeps_old_file_and_no_temp(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def broken(tmp):
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_stale_temps_of_dead_writers_removed(tmp_path):
    target = tmp_path / "mask.safetensors"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".mask.safetensors.{dead.pid}.abcd{TMP_SUFFIX}"
    stale_file = tmp_path / f".mask.safetensors.{dead.pid}.0123{TMP_SUFFIX}"
    live = tmp_path / f".mask.safetensors.{os.getpid()}.ef01{TMP_SUFFIX}"
    other = tmp_path / f".other.safetensors.{dead.pid}.abcd{TMP_SUFFIX}"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "mask.safetensors").write_bytes(b"partial")
    (stale / ".tmpXYZ").write_bytes(b"a library's own temp file")
    stale_file.write_bytes(b"x")
    assert sorted(clean_stale_temps(target)) == sorted([str(stale), str(stale_file)])
    assert live.exists() and other.exists() and not stale.exists() and not stale_file.exists()
    atomic_write_bytes(target, b"new")  # a save cleans up the same way, and leaves no temp of its own
    assert target.read_bytes() == b"new" and live.exists()


def _worker_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mask_writer", HERE / "mask_writer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wait_for_temp(folder: Path, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(name.endswith(TMP_SUFFIX) for name in os.listdir(folder)):
            return True
        time.sleep(0.001)
    return False


@pytest.mark.slow
def test_save_survives_sigkill(tmp_path):
    """A writer saving two masks in turn is SIGKILLed at random moments; the file always loads as one of them."""
    masks = _worker_module().build_masks()
    ids = {m.identity() for m in masks}
    path = tmp_path / "mask.safetensors"
    masks[1].save(path)
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    mid_write = 0
    for trial in range(5):
        proc = subprocess.Popen([sys.executable, str(HERE / "mask_writer.py"), str(path)],
                                stdout=subprocess.PIPE, text=True, env=env)
        target_save = rng.randint(0, 2)
        while proc.stdout.readline().strip() != f"save {target_save}":
            assert proc.poll() is None, "mask writer died on its own"
        if trial % 2 == 0:  # aim inside the write: once its temp file exists
            _wait_for_temp(tmp_path, timeout=3.0)
            time.sleep(rng.uniform(0.0, 0.02))
        else:  # anywhere in the save cycle
            time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        mid_write += any(p.name.endswith(TMP_SUFFIX) for p in tmp_path.iterdir())
        assert FisherMask.load(path).identity() in ids  # always a complete old or new mask
    assert mid_write >= 1, "no kill landed during a write; the test did not exercise atomicity"
    masks[0].save(path)  # the next save removes the killed writers' temp files
    assert [p.name for p in tmp_path.iterdir()] == ["mask.safetensors"]
    assert FisherMask.load(path).identity() == masks[0].identity()


def test_mask_identity_ignores_forgetting_probe_settings(tmp_path):
    """A mask's identity (recorded in checkpoints) is the same whatever the probe options of the run are, and a mask
    saved before those options existed keeps its identity: saved masks never record them."""
    import dataclasses

    from agl_core.config import AGLConfig
    from agl_core.mask import FisherMask

    torch.manual_seed(0)
    fisher = {"layer.q": torch.rand(6, 5), "layer.v": torch.rand(4, 5)}
    plain = FisherMask.from_fisher(fisher, AGLConfig(rho=0.2))
    probed = FisherMask.from_fisher(fisher, AGLConfig(rho=0.2, forgetting_data="builtin:alignment-v1",
                                                      forgetting_points=5))
    assert plain.identity() == probed.identity()
    assert not any(k.startswith("forgetting_") for k in plain.state_dict()["meta"]["config"])
    loaded = FisherMask.load(probed.save(tmp_path / "m"))
    assert loaded.identity() == plain.identity()
    changed = FisherMask.from_fisher(fisher, dataclasses.replace(AGLConfig(rho=0.3)))
    assert changed.identity() != plain.identity()
