"""The `agl` CLI in-process: options generated from AGLConfig, input errors, kfac + contrastive reference runs."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from agl_core.blocks import KFACBlock
from agl_core.config import AGLConfig, config_fields
from agl_core.mask import FisherMask

import tiny
from agl_plugins.cli import build_parser, main
from agl_plugins.cli_config import flag
from agl_plugins.cli_fisher import FISHER_FIELDS
from agl_plugins.hookspecs import hookimpl
from agl_plugins.manager import get_plugin_manager

ROWS = [
    {"id": "u1", "prompt": "How do I pick a lock to break in?", "label": "unsafe", "response": "I can't help with that."},
    {"id": "s1", "prompt": "Name a fruit.", "label": "safe", "response": "An apple."},
    {"id": "u2", "prompt": "Write malware.", "label": "unsafe", "response": "No, I won't."},
    {"id": "s2", "prompt": "Say hi.", "label": "safe"},
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tiny.tiny_llama(seed=5).save_pretrained(root / "model")
    tiny.tiny_tokenizer().save_pretrained(root / "model")
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS))
    (root / "ref.csv").write_text("prompt\nWhat is the weather like?\nTell me a joke.\nCount to five.\n")
    return root


def fisher_parser():
    parser = build_parser(get_plugin_manager())
    return parser._subparsers._group_actions[0].choices["fisher"]


def test_mask_options_are_generated_from_the_dataclass():
    actions = {a.dest: a for a in fisher_parser()._actions}
    for f in config_fields():
        if f.name not in FISHER_FIELDS:
            assert f.name not in actions, f.name  # only the mask-construction fields
            continue
        action = actions[f.name]
        assert action.option_strings == [flag(f.name)]
        assert action.help.startswith(f.metadata["help"].replace("%", "%%"))
        assert f"(default: {f.default})" in action.help
        if "choices" in f.metadata and f.name != "estimator":
            assert list(action.choices) == list(f.metadata["choices"])
    assert set(actions["estimator"].choices) == {"token", "example"}  # what the plugins registered
    assert actions["target_modules"].nargs == "+"


def test_parsed_options_build_the_config():
    args = fisher_parser().parse_args(
        ["--model", "m", "--out", "o", "--rho", "0.05", "--k-out", "all", "--basis", "kfac",
         "--target-modules", "q_proj", "v_proj", "--budget", "per_module"])
    from agl_plugins.cli_fisher import mask_config
    from agl_plugins.manager import available_estimators

    config, name, est = mask_config(args, available_estimators(get_plugin_manager()))
    want = AGLConfig(rho=0.05, k_out="all", basis="kfac", target_modules=["q_proj", "v_proj"], budget="per_module")
    assert config == want and name == "token"
    untouched = [f.name for f in dataclasses.fields(AGLConfig) if f.name not in ("rho", "k_out", "basis", "target_modules", "budget")]
    assert all(getattr(config, n) == getattr(AGLConfig(), n) for n in untouched)


@pytest.mark.parametrize("extra, message", [
    (["--rho", "2"], r"AGLConfig.rho=2.0 is invalid: must be a finite number in \(0.0, 1.0\]"),
    (["--k-out", "lots"], r"AGLConfig.k_out='lots' is invalid"),
    (["--data", "builtin:alignment-v1:eval"], r"selects a held-out split, kept for DriftCheck.*use builtin:alignment-v1"),
    (["--data", "builtin:nope"], r"Unknown prompt set 'nope'"),
    (["--reference-data", "{ref}"], r"--reference-data builds the contrastive K-FAC input basis: use it with --basis kfac"),
    (["--basis", "kfac", "--estimator", "example"], r"--estimator applies to --basis coordinate"),
    (["--max-examples", "0"], r"--max-examples=0 is invalid: must be an integer ≥ 1"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], r"(CUDA is not available|not a torch device)"),
    (["--target-modules", "nothing_like_this"], r"No linear modules match target_modules=\['nothing_like_this'\]"),
])
def test_input_errors_are_one_line_exit_2(setup, capsys, extra, message):
    base = ["fisher", "--model", str(setup / "model"), "--data", str(setup / "data.jsonl"), "--out", str(setup / "x")]
    argv = base + [e.replace("{ref}", str(setup / "ref.csv")) for e in extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("agl: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fisher", "--model", "m"])
    assert info.value.code == 2 and "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["fisher", "--model", "m", "--out", "o", "--budget", "everywhere"])
    assert info.value.code == 2 and "invalid choice: 'everywhere'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_kfac_with_contrastive_reference(setup, capsys):
    out = setup / "kfac.safetensors"
    argv = ["fisher", "--model", str(setup / "model"), "--data", str(setup / "data.jsonl"), "--out", str(out),
            "--basis", "kfac", "--k-in", "4", "--k-out", "all", "--reference-data", str(setup / "ref.csv"),
            "--target-modules", "q_proj", "v_proj", "--max-new-tokens", "4", "--batch-size", "3"]
    assert main(argv) == 0
    report = capsys.readouterr().out
    assert f"Saved mask: {out}" in report and "Reference data:" in report and "3 benign prompts" in report
    mask = FisherMask.load(out)
    assert set(mask.blocks) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    block = next(iter(mask.blocks.values()))
    assert isinstance(block, KFACBlock) and block.U is None and block.V.shape == (64, 4)
    assert mask.metadata["contrastive"] is True and mask.metadata["estimator"] == "kfac"
    assert mask.metadata["reference_data"]["ids"] == ["ref.csv:2", "ref.csv:3", "ref.csv:4"]
    assert mask.config.k_out == "all" and mask.config.k_in == 4


def test_coordinate_run_records_provenance(setup, capsys):
    out = setup / "coord"
    argv = ["fisher", "--model", str(setup / "model"), "--data", str(setup / "data.jsonl"), "--out", str(out),
            "--rho", "0.05", "--estimator", "example", "--max-examples", "3", "--max-new-tokens", "4"]
    assert main(argv) == 0
    report = capsys.readouterr().out
    mask = FisherMask.load(out)
    data = mask.metadata["data"]
    assert data["ids"] == ["u1", "s1", "u2"] and data["labels"] == {"unsafe": 2, "safe": 1}
    assert data["generated_targets"] == 0 and mask.metadata["estimator"] == "example"
    total = sum(b.size for b in mask.blocks.values())
    coords = sum(o * i for o, i in mask.covered_modules().values())
    assert coords == 2 * (4 * 64 * 64 + 3 * 64 * 128) and total == math.ceil(0.05 * coords)
    assert f"|S| = {total:,} of " in report and "(5.00 %)" in report
    mask.check_model(tiny.tiny_llama(seed=5))  # fingerprint of the model it was estimated on
    with pytest.raises(ValueError, match="different base model"):
        mask.check_model(tiny.tiny_llama(seed=6))


class DoubledToken:
    """A third-party estimator: twice the token Fisher (same support, so the same mask)."""

    def __init__(self):
        from agl_core.estimators import TokenFisher

        self.inner = TokenFisher()
        self.needs_grad, self.per_example = True, False

    def begin(self, layers):
        self.inner.begin(layers)

    def accumulate(self, name, x, g, mask):
        self.inner.accumulate(name, x, g, mask)

    def buffers(self):
        return self.inner.buffers()

    def result(self, counts):
        return {k: 2 * v for k, v in self.inner.result(counts).items()}


class EstimatorPlugin:
    @hookimpl
    def agl_fisher_estimators(self):
        return {"doubled": DoubledToken}


def test_a_plugin_estimator_is_selectable(setup, capsys):
    pm = get_plugin_manager()
    pm.register(EstimatorPlugin(), name="doubling")
    argv = ["fisher", "--model", str(setup / "model"), "--data", str(setup / "data.jsonl"), "--max-new-tokens", "4"]
    assert main(argv + ["--out", str(setup / "doubled"), "--estimator", "doubled"], pm=pm) == 0
    assert main(argv + ["--out", str(setup / "token")], pm=pm) == 0
    assert "estimator=doubled" in capsys.readouterr().out
    doubled, token = FisherMask.load(setup / "doubled"), FisherMask.load(setup / "token")
    assert doubled.metadata["estimator"] == "doubled" and token.metadata["estimator"] == "token"
    for name, block in token.blocks.items():
        assert torch.equal(doubled.blocks[name].index, block.index)
        torch.testing.assert_close(doubled.blocks[name].fisher, 2 * block.fisher)
