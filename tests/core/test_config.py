"""AGLConfig validation, warm-up schedule and dict round-trip."""

import dataclasses

import pytest

from agl_core import AGLConfig
from agl_core.config import config_fields


def test_defaults_are_valid_and_documented():
    cfg = AGLConfig()
    assert cfg.k_out == 16 and cfg.split == "soft" and cfg.budget == "global"
    for f in config_fields():
        assert f.metadata.get("help"), f"field {f.name} has no help text"


@pytest.mark.parametrize(
    "field,value,fragment",
    [
        ("lambda_a", -1.0, "lambda_a=-1.0"),
        ("lambda_t", float("nan"), "lambda_t=nan"),
        ("lambda_nc", "x", "lambda_nc='x'"),
        ("alpha", 1.5, "[0.0, 1.0]"),
        ("eps", 0.0, "(0.0, inf)"),
        ("rho", 0.0, "(0.0, 1.0]"),
        ("rho", 1.01, "rho=1.01"),
        ("budget", "layer", "['global', 'per_module']"),
        ("split", "medium", "['soft', 'hard']"),
        ("basis", "svd", "['coordinate', 'kfac']"),
        ("task_reg", "fisher", "['identity']"),
        ("estimator", "batch", "['token', 'example']"),
        ("k_in", 0, "k_in=0"),
        ("k_in", True, "k_in=True"),
        ("k_out", "some", "'all'"),
        ("k_out", 0, "k_out=0"),
        ("warmup_steps", -3, "warmup_steps=-3"),
        ("adapters", [], "adapters=[]"),
        ("target_modules", [3], "target_modules=[3]"),
        ("enabled", "yes", "enabled='yes'"),
    ],
)
def test_invalid_values_name_field_value_and_range(field, value, fragment):
    with pytest.raises(ValueError) as err:
        AGLConfig(**{field: value})
    msg = str(err.value)
    assert f"AGLConfig.{field}=" in msg and fragment in msg


def test_k_out_and_lists_are_normalised():
    assert AGLConfig(k_out="all").k_out == "all"
    assert AGLConfig(k_out="ALL").k_out == "all"
    assert AGLConfig(k_out="8").k_out == 8
    assert AGLConfig(target_modules="q_proj, v_proj").target_modules == ["q_proj", "v_proj"]


def test_warmup_is_linear_then_flat():
    cfg = AGLConfig(warmup_steps=4)
    assert [cfg.lambda_scale(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert AGLConfig().lambda_scale(0) == 1.0


def test_dict_round_trip_and_unknown_keys():
    cfg = AGLConfig(lambda_a=2.0, k_out="all", target_modules=["q_proj"])
    again = AGLConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="Unknown AGLConfig option.*'lamda_a'"):
        AGLConfig.from_dict({"lamda_a": 1.0})
    assert set(cfg.mask_settings()) <= {f.name for f in dataclasses.fields(AGLConfig)}
