"""Projecting a saved PEFT adapter off a mask's input directions: the reloaded model's ΔW has no protected part."""

import pytest
import torch
from peft import PeftModel

from agl_core.blocks import KFACBlock
from agl_core.config import AGLConfig
from agl_core.mask import FisherMask
from agl_plugins.project import project_adapter_dir

import tiny


def _delta(peft_model, module):
    """Dense ΔW = s·B·A of one LoRA layer, in float64 (the reference)."""
    layer = peft_model.get_submodule(f"base_model.model.{module}")
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    return layer.scaling["default"] * B @ A


def test_projected_adapter_loads_and_has_no_update_on_the_protected_directions(tmp_path):
    peft_model = tiny.tiny_lora(seed=3)
    peft_model.save_pretrained(str(tmp_path / "plain"))
    gen = torch.Generator().manual_seed(4)
    q_mod, v_mod = "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"
    V, _ = torch.linalg.qr(torch.randn(64, 3, generator=gen))
    blocks = {q_mod: KFACBlock(shape=(64, 64), U=None, V=V, mu=torch.ones(64), lam=torch.ones(3), norm=1.0, kappa=0.5)}
    mask = FisherMask(blocks, AGLConfig(basis="kfac", k_in=3, k_out="all"))
    mask.save(str(tmp_path / "mask"))
    info = project_adapter_dir(tmp_path / "plain", tmp_path / "mask", tmp_path / "projected")
    assert info["projected_modules"] == 1
    base = tiny.tiny_llama(seed=3)
    projected = PeftModel.from_pretrained(base, str(tmp_path / "projected"))
    before, after = _delta(peft_model, q_mod), _delta(projected, q_mod)
    eye = torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(after, before @ (eye - V.double() @ V.double().T), atol=1e-6, rtol=1e-5)
    assert torch.linalg.norm(before @ V.double()) > 1e-3 and torch.linalg.norm(after @ V.double()) < 1e-6
    torch.testing.assert_close(_delta(projected, v_mod), _delta(peft_model, v_mod))  # not in the mask: untouched

    with pytest.raises(ValueError, match="already holds an adapter"):
        project_adapter_dir(tmp_path / "plain", tmp_path / "mask", tmp_path / "projected")
    with pytest.raises(ValueError, match="is not a saved PEFT LoRA adapter"):
        project_adapter_dir(tmp_path / "mask", tmp_path / "mask", tmp_path / "other")
