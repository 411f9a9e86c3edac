"""SmolLM2-135M-Instruct with AGL: a few Trainer steps checked against core, and the README example run."""

from __future__ import annotations

import ast
import dataclasses
import re
import shutil
from pathlib import Path

import pytest
import torch

from agl_core import AGLConfig, AGLPenalty, FisherMask, estimate_fisher, make_batches

TARGETS = ["q_proj", "v_proj"]
README = Path(__file__).resolve().parents[3] / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Hugging Face Trainer")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def records(n: int = 4) -> list[dict]:
    from agl_plugins.prompts import alignment_v1

    return [r for r in alignment_v1().records("fisher") if r["response"]][:n]


@pytest.fixture(scope="module")
def smol_mask(tmp_path_factory):
    """A real mask of the packaged model: Fisher of q and v on 4 alignment examples, top 1 % global."""
    from agl_plugins import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    batches = make_batches(records(), tokenizer, batch_size=2, max_length=64)
    fisher = estimate_fisher(model, batches, target_modules=TARGETS, progress=False)
    config = AGLConfig(rho=0.01, target_modules=TARGETS, warmup_steps=2)
    return FisherMask.from_fisher(fisher, config, model=model).save(tmp_path_factory.mktemp("smol") / "mask"), config


def direct_check(adapter, config, checks: list):
    """Registered after the adapter's callback: at on_step_begin p.grad holds exactly what AGL added."""
    from transformers import TrainerCallback

    class Direct(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            params = adapter.callback.lora_parameters
            direct = AGLPenalty(model, adapter.callback.mask, config)(state.global_step)
            grads = torch.autograd.grad(direct.total, params)
            checks.append(all(torch.equal(p.grad, g) for p, g in zip(params, grads)))

    return Direct()


@pytest.mark.slow
def test_smollm2_trains_with_agl(tmp_path, smol_mask):
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from agl_plugins import attach, load_model_and_tokenizer

    mask_path, config = smol_mask
    model, tokenizer = load_model_and_tokenizer("smollm2-135m-instruct")
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    batches = make_batches(records() * 2, tokenizer, batch_size=1, max_length=64)
    data = [{k: v[0] for k, v in batch.items()} for batch in batches]  # rows of (length,) tensors
    args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to=[], save_strategy="no",
                             disable_tqdm=True, per_device_train_batch_size=1, max_steps=3, logging_steps=1,
                             learning_rate=1e-3, dataloader_num_workers=0)
    trainer = Trainer(model=lora, args=args, train_dataset=data)
    adapter = attach(trainer, dataclasses.replace(config, mask_path=mask_path))
    assert len(adapter.penalty.modules) == 60  # q and v in each of the 30 layers
    checks: list = []
    trainer.add_callback(direct_check(adapter, config, checks))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert checks == [True, True, True]
    assert [h["agl/lambda_scale"] for h in logs] == [0.5, 1.0, 1.0]
    assert logs[0]["agl/penalty"] == 0.0  # PEFT starts with B = 0, so ΔW = 0
    assert logs[2]["agl/penalty"] > 0 and 0 < logs[2]["agl/protected_share"] < 1


def test_readme_example_uses_the_public_api_only():
    code = readme_example()
    assert "callbacks=[agl]" in code and 'AGLCallback(AGLConfig(mask_path="out/mask"' in code
    assert "._" not in code


@pytest.mark.slow
def test_readme_hf_example_runs(tmp_path, monkeypatch, capsys, smol_mask):
    """As written (in this process, cwd = a temp folder), with the small mask standing in for `make demo`'s."""
    (tmp_path / "out" / "mask").mkdir(parents=True)
    shutil.copy(smol_mask[0], tmp_path / "out" / "mask")
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md (Hugging Face Trainer example)", "exec"), {"__name__": "__main__"})
    last = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["step"] == 4 and last["agl/lambda_scale"] == 1.0
    assert last["agl/penalty"] > 0 and 0 < last["agl/protected_share"] < 1
    assert (tmp_path / "out" / "run").is_dir()
