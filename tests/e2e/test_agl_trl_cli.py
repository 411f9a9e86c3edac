"""`agl-trl sft` as a real command under `accelerate launch` with 2 gloo processes on CPU, on a tiny local model
and JSONL dataset: AGL metrics in the output and trainer_state.json, the checkpoint's AGL state, the saved adapter,
and the same run as `agl-trl sft` in one process over the same global batches."""

from __future__ import annotations

import inspect
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(TESTS / "plugins" / "trl"), str(TESTS / "plugins" / "hf")]  # trlkit, hfkit

import trlkit  # noqa: E402

AGL_TRL = Path(sys.executable).with_name("agl-trl")
LAUNCH_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")
ENV = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
ENV.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
# SGD keeps the update linear in the gradient, so 2 processes and 1 process agree to float round-off.
TRAIN = ("--optim", "sgd", "--learning_rate", "0.1", "--max_grad_norm", "0", "--save_strategy", "steps",
         "--save_steps", "3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _yaml(path: Path, mask: Path) -> Path:
    """AGL options as YAML keys, plus an accelerate option (TRL passes unknown YAML keys to accelerate launch)."""
    path.write_text(f"agl_mask_path: {mask}\nagl_lambda_a: 5.0\nagl_lambda_t: 2.0\nagl_warmup_steps: 2\n"
                    "num_processes: 2\n")
    return path


def agl_trl(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([str(AGL_TRL), *args], capture_output=True, text=True, env=ENV, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def train_logs(out: Path) -> list[dict]:
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    return [h for h in state["log_history"] if "loss" in h]


def seeds_lora_init() -> bool:
    """Whether SFTTrainer seeds the RNG before creating the LoRA weights (TRL 1.16 does; TRL 1.9 does not, so there
    two fresh processes start from different LoRA weights and cannot be compared)."""
    from trl import SFTTrainer

    return "set_seed(args.seed)" in inspect.getsource(SFTTrainer.__init__)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """`agl-trl sft … --multi_gpu` with AGL keys and num_processes: 2 in YAML; (workdir, yaml, out, stdout)."""
    root = tmp_path_factory.mktemp("agl_trl_ddp")
    work = trlkit.script_workdir(root)
    yaml = _yaml(root / "agl.yaml", work / "mask")
    launch = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(_free_port())]
    res = agl_trl("sft", *trlkit.script_argv(work, "sft", root / "ddp", "--per_device_train_batch_size", "1",
                                             *TRAIN, "--config", str(yaml)), *launch)
    return work, yaml, root / "ddp", res.stdout


@pytest.mark.slow
def test_two_process_run_logs_agl_and_saves_the_adapter(ddp_run):
    _, _, out, stdout = ddp_run
    assert stdout.count("'agl/penalty'") == 3 and "Model saved to" in stdout, stdout[-3000:]
    logs = train_logs(out)
    assert [h["agl/lambda_scale"] for h in logs] == [0.5, 1.0, 1.0]
    assert logs[0]["agl/penalty"] == 0.0 < logs[1]["agl/penalty"] and logs[2]["agl/penalty"] > 0  # B starts at 0
    assert logs[0]["num_tokens"] > 0 and all("entropy" in h for h in logs)  # TRL's own metrics alongside
    agl_state = json.loads((out / "checkpoint-3" / "agl_state.json").read_text())
    assert agl_state["global_step"] == 3 and agl_state["config"]["lambda_a"] == 5.0
    adapter = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(adapter) == sorted(load_file(str(out / "checkpoint-3" / "adapter_model.safetensors")))
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k), "the adapter trained"
    assert all(bool(torch.isfinite(v).all()) for v in adapter.values())


@pytest.mark.slow
@pytest.mark.skipif(not seeds_lora_init(), reason="this TRL draws the LoRA init before seeding (TRL 1.9)")
def test_two_process_run_matches_one_process(ddp_run, tmp_path):
    """`agl-trl sft` in one process over the same global batches: same losses, gradient norms (∇R dominates step 1,
    so a rank without it would show), AGL metrics and final adapter."""
    work, yaml, out, _ = ddp_run
    one = trlkit.script_argv(work, "sft", tmp_path / "one", "--per_device_train_batch_size", "2", *TRAIN,
                             "--config", str(yaml), "--num_processes", "1")
    assert agl_trl("sft", *one).stdout.count("'agl/penalty'") == 3
    logs = train_logs(out)
    for mine, theirs in zip(logs, train_logs(tmp_path / "one")):
        for key in ("loss", "grad_norm", "agl/penalty", "agl/L_A", "agl/E_geo"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-12), (key, mine["step"])
    assert logs[1]["grad_norm"] > 5 * logs[0]["grad_norm"], "∇R must dominate step 1 for this test to see it"
    ddp = load_file(str(out / "adapter_model.safetensors"))
    for key, weight in load_file(str(tmp_path / "one" / "adapter_model.safetensors")).items():
        torch.testing.assert_close(ddp[key], weight, rtol=1e-5, atol=1e-7)
