"""The agl_hf_callback plugin: which trainers it recognises, lookup order, and a transformers-free import."""

from __future__ import annotations

import subprocess
import sys

import hfkit
from agl_core import AGLConfig
from agl_hf_callback import AGLCallback, HFTrainerAdapter
from agl_hf_callback.plugin import agl_adapter_for_trainer
from agl_plugins import attach, get_plugin_manager, hookimpl

MASK = hfkit.make_mask()


def config(tmp_path) -> AGLConfig:
    return AGLConfig(mask_path=MASK.save(tmp_path / "mask"), rho=0.05)


class NotATrainer:
    args = model = callback_handler = None


def test_recognises_trainer_and_subclasses_only(tmp_path):
    from transformers import Trainer

    class MyTrainer(Trainer):
        pass

    assert agl_adapter_for_trainer(trainer=NotATrainer(), config=config(tmp_path)) is None
    trainer = MyTrainer(model=hfkit.lora_model(), args=hfkit.training_args(tmp_path), train_dataset=hfkit.dataset())
    adapter = attach(trainer, config(tmp_path))
    assert isinstance(adapter, HFTrainerAdapter) and adapter.trainer is trainer
    assert sum(isinstance(cb, AGLCallback) for cb in trainer.callback_handler.callbacks) == 1


def test_attach_twice_and_after_callbacks_reuses_the_callback(tmp_path):
    callback = AGLCallback(config(tmp_path))
    trainer = hfkit.trainer(hfkit.lora_model(), tmp_path, [callback])
    first = attach(trainer, config(tmp_path))
    wrapped = trainer.log
    second = attach(trainer, config(tmp_path))
    assert first.callback is callback and second.callback is callback and trainer.log is wrapped
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all("agl/penalty" in h for h in logs)


def test_a_tryfirst_plugin_wins_for_its_trainer_subclass(tmp_path):
    """How the TRL adapter takes over SFTTrainer / DPOTrainer, which subclass transformers.Trainer."""
    from transformers import Trainer

    class SpecialTrainer(Trainer):
        pass

    class SpecialPlugin:
        @hookimpl(tryfirst=True)
        def agl_adapter_for_trainer(self, trainer, config):
            return "special" if isinstance(trainer, SpecialTrainer) else None

    pm = get_plugin_manager()
    pm.register(SpecialPlugin(), name="special")
    special = SpecialTrainer(model=hfkit.lora_model(), args=hfkit.training_args(tmp_path),
                             train_dataset=hfkit.dataset())
    assert attach(special, config(tmp_path), pm=pm) == "special"
    plain = hfkit.trainer(hfkit.lora_model(), tmp_path)
    assert isinstance(attach(plain, config(tmp_path), pm=pm), HFTrainerAdapter)


def test_plugin_import_does_not_load_transformers():
    code = ("import sys; from agl_plugins import get_plugin_manager; get_plugin_manager(); "
            "import agl_hf_callback.plugin; print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
