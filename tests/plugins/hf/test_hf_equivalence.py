"""Adapter equivalence: every registered trainer adapter adds exactly what a direct agl_core call gives.

Parametrised over BUILDERS, one entry per adapter plugin that can build a trainer here. The TRL and Axolotl
adapters add theirs (a function returning a trainer over `hfkit.lora_model()`-style LoRA models, given an
output folder) and leave PENDING; a registered adapter plugin in neither list fails the coverage test.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import sys

import hfkit

sys.path.insert(0, str(hfkit.HERE.parent / "trl"))
import trlkit  # noqa: E402

from agl_core import AGLPenalty
from agl_plugins import attach, get_plugin_manager

MASK = hfkit.make_mask()
CONFIG = hfkit.agl_config(warmup_steps=3)


def build_hf_trainer(model, out):
    return hfkit.trainer(model, out, max_steps=3, learning_rate=5e-2, max_grad_norm=0.0)


BUILDERS = {"agl_hf_callback": build_hf_trainer, "agl_trl": trlkit.build_sft_trainer}
# Axolotl's trainers exist only in .venv-axolotl: its equivalence check is tests/plugins/axolotl/test_axolotl_trainers.py
PENDING = {"agl_axolotl": "tests/plugins/axolotl/test_axolotl_trainers.py (runs under .venv-axolotl)"}


def direct_check(penalty_of, records):
    """A callback, registered after the adapter's, comparing p.grad and the metrics with a direct call."""
    from transformers import TrainerCallback

    class Direct(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            direct = AGLPenalty(model, MASK, CONFIG)(state.global_step)
            params = penalty_of()
            grads = torch.autograd.grad(direct.total, params)
            records.append((direct.metrics(), [p.grad.clone() for p in params], list(grads)))

    return Direct()


def test_every_adapter_plugin_is_covered():
    pm = get_plugin_manager()
    adapters = {impl.plugin_name for impl in pm.hook.agl_adapter_for_trainer.get_hookimpls()}
    missing = adapters - set(BUILDERS) - set(PENDING)
    assert not missing, f"adapter plugins without an equivalence builder: {sorted(missing)}"
    assert "agl_hf_callback" in adapters


@pytest.mark.parametrize("plugin", sorted(BUILDERS))
def test_adapter_penalty_equals_direct_core_call(tmp_path, plugin):
    model = hfkit.lora_model()
    trainer = BUILDERS[plugin](model, tmp_path)
    adapter = attach(trainer, dataclasses.replace(CONFIG, mask_path=MASK.save(tmp_path / "mask")))
    assert adapter.plugin == plugin
    callback = adapter.callback
    records: list = []
    trainer.add_callback(direct_check(lambda: callback.lora_parameters, records))  # runs after the adapter's callback
    trainer.train()
    assert len(records) == 3
    logged = [h for h in trainer.state.log_history if "agl/penalty" in h]
    for step, (metrics, added, direct) in enumerate(records):
        # on_step_begin follows zero_grad(), so p.grad holds exactly what the adapter added: ∇R
        for a, d in zip(added, direct):
            torch.testing.assert_close(a, d, rtol=0, atol=0)
        assert logged[step]["agl/penalty"] == pytest.approx(metrics["agl/penalty"], rel=1e-12)
        assert metrics["agl/lambda_scale"] == CONFIG.lambda_scale(step) and metrics["agl/penalty"] > 0
    assert records[0][0] != records[2][0], "the weights moved: the comparison ran at three different points"
