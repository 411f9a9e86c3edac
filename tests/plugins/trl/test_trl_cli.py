"""`agl-trl sft|dpo` in-process: options generated from AGLConfig, name clashes, unknown --agl_* flags (command line
and YAML), plain runs identical to TRL's own script, and AGL runs with the metrics in TRL's logs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

import trlkit
from agl_core.config import config_fields
from agl_trl import AGLStartError, agl_arguments_class
from agl_trl import args as agl_args
from agl_trl.cli import main, parse, run


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return trlkit.script_workdir(tmp_path_factory.mktemp("agl_trl_cli"))


def test_agl_options_are_generated_from_every_config_field():
    fields = {f.name: f for f in dataclasses.fields(agl_arguments_class())}
    assert list(fields) == [f"agl_{f.name}" for f in config_fields()]
    for f in config_fields():
        ours = fields[f"agl_{f.name}"]
        assert ours.default is None and f.metadata["help"] in ours.metadata["help"]
        assert ours.metadata.get("choices") == (list(f.metadata["choices"]) if "choices" in f.metadata else None)


@pytest.mark.parametrize("script", ["sft", "dpo"])
def test_no_agl_option_clashes_with_a_trl_script_argument(script):
    trl_names = {f.name for dc in agl_args.trl_dataclasses(script) for f in dataclasses.fields(dc)}
    assert {"learning_rate", "dataset_name", "lora_r", "streaming"} <= trl_names  # all four TRL dataclasses
    assert not trl_names & {f"agl_{f.name}" for f in config_fields()}
    assert agl_args.name_clashes(script) == []


def test_a_clash_is_reported(monkeypatch):
    @dataclasses.dataclass
    class Clashing:
        agl_rho: float = 0.5

    real = agl_args.trl_dataclasses
    monkeypatch.setattr(agl_args, "trl_dataclasses", lambda script: (*real(script), Clashing))
    assert agl_args.name_clashes("sft") == ["agl_rho"]
    with pytest.raises(ValueError, match=r"\['agl_rho'\] clash with TRL sft arguments"):
        agl_args.make_parser("sft")


def test_command_line_and_yaml_options(work, tmp_path):
    yaml = tmp_path / "cfg.yaml"
    yaml.write_text(f"learning_rate: 0.003\nagl_mask_path: {work / 'mask'}\nagl_lambda_a: 5.0\n"
                    "agl_target_modules: [q_proj]\nagl_enabled: false\n")
    argv = trlkit.script_argv(work, "sft", tmp_path / "o", "--config", str(yaml), "--agl_lambda_a", "7",
                              "--agl-warmup-steps", "2")
    (script, training, model, _), agl, _, cli_rest = parse("sft", argv)
    assert cli_rest == [] and training.learning_rate == 0.003 and model.lora_r == 4
    assert agl_args.given_options(agl) == {"lambda_a": 7.0, "mask_path": str(work / "mask"),
                                           "target_modules": ["q_proj"], "warmup_steps": 2, "enabled": False}
    config = agl_args.resolve_config(agl)
    assert config.lambda_a == 7.0 and config.rho == trlkit.MASK.config.rho and config.enabled is False
    (_, _, _, _), plain, _, _ = parse("sft", trlkit.script_argv(work, "sft", tmp_path / "o"))
    assert agl_args.resolve_config(plain) is None


@pytest.mark.parametrize("where", ["command line", "yaml"])
def test_unknown_agl_option_lists_the_valid_ones(work, tmp_path, where, monkeypatch, capsys):
    for name in ("LOCAL_RANK", "ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    extra = ["--agl_lamda_a", "3"]
    if where == "yaml":
        (tmp_path / "cfg.yaml").write_text("agl_lamda_a: 3\n")
        extra = ["--config", str(tmp_path / "cfg.yaml")]
    argv = trlkit.script_argv(work, "sft", tmp_path / "o", *extra)
    with pytest.raises(AGLStartError, match="Unknown AGL option.*--agl_lamda_a.*Valid AGL options: --agl_lambda_a"):
        parse("sft", argv)
    assert main(["sft", *argv]) == 2  # the launcher stops before starting accelerate
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("agl-trl: error: Unknown AGL option(s) --agl_lamda_a") and "--agl_target_modules" in err


def test_bad_agl_values_stop_with_one_line(work, tmp_path):
    base = trlkit.script_argv(work, "sft", tmp_path / "o")
    with pytest.raises(AGLStartError, match="no --agl_mask_path"):
        run("sft", [*base, "--agl_lambda_a", "2"])
    with pytest.raises(AGLStartError, match="AGLConfig.rho=2.0 is invalid"):
        run("sft", [*base, "--agl_mask_path", str(work / "mask"), "--agl_rho", "2"])
    with pytest.raises(AGLStartError, match="No AGL mask at"):
        run("sft", [*base, "--agl_mask_path", str(tmp_path / "missing")])


def _adapter(out) -> dict:
    return load_file(str(out / "adapter_model.safetensors"))


def test_without_agl_options_it_is_trls_own_script(work, tmp_path):
    from transformers import set_seed
    from trl.scripts import sft

    argv = trlkit.script_argv(work, "sft", tmp_path / "ours", "--learning_rate", "0.05")
    set_seed(0)  # TRL 1.9 creates the LoRA weights before the Trainer seeds the RNG
    assert run("sft", argv) is None
    theirs = trlkit.script_argv(work, "sft", tmp_path / "theirs", "--learning_rate", "0.05")
    set_seed(0)
    sft.main(*sft.make_parser().parse_args_and_config(theirs))
    ours, ref = _adapter(tmp_path / "ours"), _adapter(tmp_path / "theirs")
    assert ours.keys() == ref.keys() and any("lora_B" in k for k in ours)
    assert any(float(v.abs().max()) > 0 for k, v in ours.items() if "lora_B" in k), "the adapter trained"
    for key in ours:
        torch.testing.assert_close(ours[key], ref[key], rtol=0, atol=0)


@pytest.mark.parametrize("script", ["sft", "dpo"])
def test_with_agl_options_metrics_reach_trl_logs(work, tmp_path, script):
    argv = trlkit.script_argv(work, script, tmp_path / "agl", "--learning_rate", "0.05",
                              "--agl_mask_path", str(work / "mask"), "--agl_warmup_steps", "2")
    adapter = run(script, argv)
    assert adapter.plugin == "agl_trl" and adapter.trainer.args.output_dir == str(tmp_path / "agl")
    logs = [h for h in adapter.trainer.state.log_history if "loss" in h]
    assert [h["agl/lambda_scale"] for h in logs] == [0.5, 1.0, 1.0]
    assert logs[0]["agl/penalty"] == 0.0 < logs[1]["agl/penalty"], "B starts at zero, then ΔW ≠ 0 is penalised"
    assert (tmp_path / "agl" / "adapter_model.safetensors").is_file()


def test_command_is_sft_or_dpo(capsys):
    assert main(["grpo", "--output_dir", "x"]) == 2
    assert "agl-trl: error: unknown command 'grpo'; choose one of sft, dpo." in capsys.readouterr().err
    assert main(["--help"]) == 0 and "agl-trl sft --help" in capsys.readouterr().out
