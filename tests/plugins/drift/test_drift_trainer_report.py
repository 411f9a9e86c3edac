"""`agl report --trainer-state` on a trainer_state.json written by a real (tiny) Trainer run with AGL metrics."""

from __future__ import annotations

import json

import pytest
from agl_core import AGLConfig, AGLPenalty, FisherMask, estimate_fisher
from PIL import Image
from transformers import Trainer, TrainingArguments

import tiny
from agl_plugins.cli import main
from agl_plugins.drift import trainer_report
from agl_plugins.drift.trainer_report import collect_series


class PenaltyTrainer(Trainer):
    """Adds the AGL penalty to the loss and its metrics (agl/*) to every training log entry."""

    def __init__(self, *args, penalty, **kwargs):
        super().__init__(*args, **kwargs)
        self.penalty = penalty

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        loss = super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
        if return_outputs:
            return loss[0] + self.penalty().total, loss[1]
        return loss + self.penalty().total

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:
            logs = dict(logs, **self.penalty().metrics())
        super().log(logs, *args, **kwargs)


@pytest.fixture(scope="module")
def trainer_state(tmp_path_factory):
    out = tmp_path_factory.mktemp("trainer")
    base = tiny.tiny_llama(seed=4)
    config = AGLConfig(rho=0.05, lambda_a=1.0, target_modules=["q_proj", "v_proj"])
    fisher = estimate_fisher(base, tiny.tiny_batches(2, seed=1), target_modules=config.target_modules, progress=False)
    mask = FisherMask.from_fisher(fisher, config, model=base)
    lora = tiny.tiny_lora(base, seed=4)
    data = [{k: v[i] for k, v in b.items()} for b in tiny.tiny_batches(4, seed=2) for i in range(2)]
    args = TrainingArguments(output_dir=str(out), max_steps=4, logging_steps=1, per_device_train_batch_size=2,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = PenaltyTrainer(model=lora, args=args, train_dataset=data, penalty=AGLPenalty(lora, mask, config))
    trainer.train()
    trainer.save_state()
    return out / "trainer_state.json"


def test_trainer_report_plots_loss_and_agl_metrics(trainer_state, tmp_path):
    result = trainer_report(trainer_state, tmp_path / "rep")
    history = json.loads(trainer_state.read_text())["log_history"]
    metrics = result["metrics"]
    assert list(metrics)[:3] == ["loss", "agl/penalty", "agl/E_geo"] and "agl/L_A" in metrics
    assert metrics["loss"]["steps"] == [1, 2, 3, 4]
    assert metrics["agl/penalty"]["values"] == [h["agl/penalty"] for h in history if "agl/penalty" in h]
    assert metrics["agl/penalty"]["values"][0] > 0
    with Image.open(tmp_path / "rep" / "training.png") as img:
        img.verify()
        assert img.format == "PNG" and img.size[0] >= 800
    md = (tmp_path / "rep" / "training.md").read_text()
    assert "| `agl/penalty` | 4 | 1–4 |" in md and "![training metrics](training.png)" in md
    assert "no `agl/*` metrics" not in md


def test_report_command_and_bad_trainer_states(trainer_state, tmp_path, capsys):
    assert main(["report", "--trainer-state", str(trainer_state.parent), "--out", str(tmp_path / "cli")]) == 0
    assert "training.png" in capsys.readouterr().out and (tmp_path / "cli" / "training.md").is_file()
    (tmp_path / "bad.json").write_text("{nope")
    (tmp_path / "other.json").write_text(json.dumps({"global_step": 3}))
    (tmp_path / "empty.json").write_text(json.dumps({"log_history": [{"step": 1, "learning_rate": 0.1}]}))
    out = ["--out", str(tmp_path)]
    cases = [
        (["--trainer-state", str(tmp_path / "missing.json"), *out], "does not exist; pass the trainer_state.json"),
        (["--trainer-state", str(tmp_path / "bad.json"), *out], "is not valid JSON"),
        (["--trainer-state", str(tmp_path / "other.json"), *out], "has no 'log_history' list"),
        (["--trainer-state", str(tmp_path / "empty.json"), *out], "logs neither a loss nor agl/* metrics"),
        (["--trainer-state", str(trainer_state)], "--trainer-state needs --out FOLDER"),
    ]
    for args, message in cases:
        assert main(["report", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_series_skip_non_numbers_and_entries_without_a_step():
    history = [{"step": 1, "loss": 2.0, "agl/x": float("nan")}, {"loss": 1.0}, {"step": 2, "loss": 1.5, "agl/x": 0.3},
               {"step": 3, "eval_loss": 1.2, "agl/flag": True}]
    series = collect_series(history)
    assert series == {"loss": ([1, 2], [2.0, 1.5]), "eval_loss": ([3], [1.2]), "agl/x": ([2], [0.3])}
