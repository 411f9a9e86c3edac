"""Axolotl end to end: `axolotl train` subprocesses (SFT, DPO) on a tiny local model with AGLPlugin and an `agl:` block.

Five runs of .venv-axolotl's `axolotl train`, two or three at a time: SFT with AGL (plus a second plugin and
TensorBoard; the mask is estimated from a local alignment file), SFT without any plugin, DPO with AGL (reusing the
SFT run's mask through agl.mask_path), DPO without, and a config with a bad `agl:` value. The SFT+AGL run uses
Axolotl's default launcher (accelerate), the others `--launcher python` (same training, ~25 s less start-up).
"""

from __future__ import annotations

import pytest

import axolotl_kit as kit
from agl_core import FisherMask

pytestmark = pytest.mark.slow

AGL_KEYS = ("agl/penalty", "agl/L_A", "agl/L_T", "agl/E_rie", "agl/E_geo", "agl/protected_share", "agl/lambda_scale")
MAX_STEPS = 8  # logging_steps 2 → 4 training logs


def agl_block(inputs, **extra):
    return {"alignment_dataset": str(inputs["alignment"]), "max_new_tokens": 8, "rho": 0.05, "lambda_a": 10.0,
            "warmup_steps": 2, **extra}


def start(name, folder, inputs, launcher="python", rl=None, plugins=None, agl=None, **extra):
    cfg = kit.base_config(name, folder, inputs, rl=rl, max_steps=MAX_STEPS)
    cfg.update(extra)
    if plugins:
        cfg["plugins"] = plugins
    if agl is not None:
        cfg["agl"] = agl
    return kit.Run(name, kit.write_config(folder, name, cfg), folder, launcher=launcher)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    kit.axolotl_bin()  # a clear failure ("run make setup") before any work when the venv is missing
    folder = tmp_path_factory.mktemp("axolotl")
    inputs = kit.make_inputs(folder)
    first = [
        start("sft_agl", folder, inputs, launcher=None, plugins=[kit.SECOND_PLUGIN, kit.AGL_PLUGIN],
              agl=agl_block(inputs), use_tensorboard=True),
        start("sft_plain", folder, inputs),
        start("bad", folder, inputs, plugins=[kit.AGL_PLUGIN], agl=agl_block(inputs, rho=2.0)),
    ]
    done = {r.name: r.wait() for r in first}
    mask_dir = folder / "sft_agl" / "agl_mask"
    second = [
        start("dpo_agl", folder, inputs, rl="dpo", plugins=[kit.AGL_PLUGIN], agl=agl_block(inputs, mask_path=str(mask_dir))),
        start("dpo_plain", folder, inputs, rl="dpo"),
    ]
    done.update({r.name: r.wait() for r in second})
    print("\naxolotl train runs (s): " + ", ".join(f"{r.name} {r.seconds:.0f}" for r in done.values()))
    return {"runs": done, "folder": folder, "mask": mask_dir}


def ok(run):
    assert run.returncode == 0, f"{run.name} failed ({run.returncode}); log {run.log_path}:\n{run.tail()}"
    return run


def protected_vs_plain(runs, agl_name, plain_name):
    mask = FisherMask.load(runs["mask"])
    folder = runs["folder"]
    with_agl = kit.support_norms(kit.lora_delta(folder / agl_name), mask)
    without = kit.support_norms(kit.lora_delta(folder / plain_name), mask)
    return with_agl, without


def test_sft_estimates_the_mask_and_logs_agl_metrics_in_console_trainer_state_and_tensorboard(runs):
    run = ok(runs["runs"]["sft_agl"])
    out = run.output
    assert "AGL: no mask at" in out and "estimating the alignment Fisher mask" in out and "AGL: saved the mask" in out
    assert "AxolotlTrainerAdapter on AxolotlTrainer" in out
    assert (runs["mask"] / "mask.safetensors").is_file()
    console = kit.console_logs(out)
    assert len(console) == MAX_STEPS // 2 and all(k in log for log in console for k in AGL_KEYS)
    assert [log["agl/lambda_scale"] for log in console] == pytest.approx([0.75, 1, 1, 1], abs=1e-3)  # window means
    assert all(log["agl/penalty"] > 0 for log in console[1:])
    history = kit.trainer_state_logs(runs["folder"] / "sft_agl")
    assert [h["agl/penalty"] for h in history] == pytest.approx([c["agl/penalty"] for c in console], rel=1e-3)
    scalars = kit.tensorboard_scalars(runs["folder"] / "sft_agl")
    assert [v for _, v in scalars["train/agl/penalty"]] == pytest.approx([h["agl/penalty"] for h in history], rel=1e-5)
    assert {f"train/{k}" for k in AGL_KEYS} <= set(scalars)


def test_sft_penalty_shrinks_the_update_on_the_protected_support(runs):
    ok(runs["runs"]["sft_agl"])
    ok(runs["runs"]["sft_plain"])
    (on_agl, off_agl), (on_plain, off_plain) = protected_vs_plain(runs, "sft_agl", "sft_plain")
    print(f"SFT ‖ΔW on S‖: {on_agl:.4f} with AGL, {on_plain:.4f} without; off S: {off_agl:.4f} vs {off_plain:.4f}")
    assert on_agl < 0.5 * on_plain  # the penalised part of the update shrinks ...
    assert 0.7 < off_agl / off_plain < 1.4  # ... the rest of it keeps its size
    plain_logs = kit.console_logs(runs["runs"]["sft_plain"].output)
    assert plain_logs and not any(k.startswith("agl/") for log in plain_logs for k in log)


def test_another_plugin_listed_beside_ours_runs_and_sees_our_metrics(runs):
    run = ok(runs["runs"]["sft_agl"])
    events = kit.second_plugin_events(runs["folder"] / "sft_agl.second.jsonl")
    kinds = [e["event"] for e in events]
    for hook in ("register", "add_callbacks_post_trainer", "post_trainer_create", "post_train"):
        assert hook in kinds, (hook, kinds)
    created = next(e for e in events if e["event"] == "post_trainer_create")
    assert created["trainer"] == "AxolotlTrainer"
    assert {"LogRecorder", "AxolotlAGLCallback"} <= set(created["callbacks"])
    logs = [e for e in events if e["event"] == "on_log"]
    assert len(logs) == MAX_STEPS // 2
    assert all({"agl/penalty", "second/steps_seen"} <= set(e["keys"]) for e in logs)  # both plugins' metrics
    assert all("second/steps_seen" in log for log in kit.console_logs(run.output))


def test_dpo_reuses_the_mask_and_logs_agl_metrics_beside_trls(runs):
    run = ok(runs["runs"]["dpo_agl"])
    out = run.output
    assert "AGL: reusing the mask" in out and "fingerprint and settings match" in out
    assert "AxolotlTrainerAdapter on AxolotlDPOTrainer" in out
    console = kit.console_logs(out)
    assert console and all(k in log for log in console for k in AGL_KEYS + ("rewards/margins",))
    history = kit.trainer_state_logs(runs["folder"] / "dpo_agl")
    assert [h["agl/penalty"] for h in history] == pytest.approx([c["agl/penalty"] for c in console], rel=1e-3)
    assert any(h["agl/penalty"] > 0 for h in history)


def test_dpo_penalty_shrinks_the_update_on_the_protected_support(runs):
    ok(runs["runs"]["dpo_agl"])
    ok(runs["runs"]["dpo_plain"])
    (on_agl, off_agl), (on_plain, off_plain) = protected_vs_plain(runs, "dpo_agl", "dpo_plain")
    print(f"DPO ‖ΔW on S‖: {on_agl:.4f} with AGL, {on_plain:.4f} without; off S: {off_agl:.4f} vs {off_plain:.4f}")
    assert on_agl < 0.5 * on_plain
    assert 0.7 < off_agl / off_plain < 1.4


def test_a_bad_agl_value_fails_axolotls_config_validation_naming_the_field(runs):
    run = runs["runs"]["bad"]
    assert run.returncode != 0
    assert "agl.rho" in run.output and "AGLConfig.rho=2.0 is invalid" in run.output
    assert "Starting trainer" not in run.output and not (runs["folder"] / "bad" / "agl_mask").exists()
