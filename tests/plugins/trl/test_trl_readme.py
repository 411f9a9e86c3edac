"""The README's TRL examples: the public API only, and the SFT example run as written on SmolLM2-135M."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest
import torch

from agl_core import AGLConfig, FisherMask, find_linear_modules

README = Path(__file__).resolve().parents[3] / "README.md"
TARGETS = ["q_proj", "v_proj"]


def trl_examples() -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## TRL\n")
    end = text.index("\n## ", start + 5)
    return re.findall(r"```python\n(.*?)```", text[start:end], re.S)


def test_examples_use_the_public_api_only():
    examples = trl_examples()
    assert len(examples) == 2
    assert 'attach(trainer, AGLConfig(mask_path="out/mask"' in examples[0] and "peft_config=LoraConfig" in examples[0]
    assert "class AGLDPOTrainer(AGLLossMixin, DPOTrainer)" in examples[1] and "self.agl_term(self" in examples[1]
    assert not any(re.search(r"\._(?!_)", code) for code in examples), "no private attributes (dunders aside)"


@pytest.mark.slow
def test_readme_sft_example_runs(tmp_path, monkeypatch, capsys):
    """As written (cwd = a temp folder), with a q/v mask of the packaged model standing in for `make demo`'s."""
    from agl_plugins import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("smollm2-135m-instruct")
    gen = torch.Generator().manual_seed(0)  # a random Fisher: this test is about the example, not the estimator
    fisher = {name: torch.rand(layer.weight.shape, generator=gen)
              for name, layer in find_linear_modules(model, TARGETS).items()}
    mask = FisherMask.from_fisher(fisher, AGLConfig(rho=0.01, target_modules=TARGETS), model=model)
    (tmp_path / "out" / "mask").mkdir(parents=True)
    shutil.copy(mask.save(tmp_path / "m"), tmp_path / "out" / "mask")
    monkeypatch.chdir(tmp_path)
    exec(compile(trl_examples()[0], "README.md (TRL example)", "exec"), {"__name__": "__main__"})
    last = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["step"] == 4 and last["agl/lambda_scale"] == 1.0 and "entropy" in last
    assert last["agl/penalty"] > 0 and 0 < last["agl/protected_share"] < 1
