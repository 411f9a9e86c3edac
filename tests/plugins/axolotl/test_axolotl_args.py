"""AGLArgs / AGLOptions: generated from AGLConfig's fields, validated by AGLConfig's own checks, errors name the field."""

from __future__ import annotations

import dataclasses
import json

import pydantic
import pytest

from agl_axolotl.args import ARGS_PATH, FISHER_OPTIONS, AGLArgs, AGLOptions, options_from_cfg
from agl_core import AGLConfig
from agl_core.config import config_fields

PLUGINS = ["agl_axolotl.AGLPlugin"]


def errors_of(data: dict) -> list[dict]:
    with pytest.raises(pydantic.ValidationError) as info:
        AGLArgs.model_validate(data)
    return info.value.errors()


def test_options_are_generated_from_every_config_field_plus_the_fisher_options():
    fields = AGLOptions.model_fields
    assert list(fields) == [f.name for f in config_fields()] + list(FISHER_OPTIONS)
    defaults = AGLConfig()
    for f in config_fields():
        assert fields[f.name].description == f.metadata["help"]
        assert getattr(AGLOptions(), f.name) == getattr(defaults, f.name), f.name  # normalised defaults
    assert AGLOptions().agl_config() == defaults
    assert ARGS_PATH.rsplit(".", 1) == ["agl_axolotl.args", "AGLArgs"]


def test_a_field_added_to_the_config_dataclass_appears_and_is_checked_by_it():
    from agl_axolotl.args import options_model

    @dataclasses.dataclass
    class Wider(AGLConfig):
        new_knob: float = dataclasses.field(default=0.5, metadata={"help": "a new option"})

        def __post_init__(self) -> None:
            super().__post_init__()
            if not 0 <= self.new_knob <= 1:
                raise ValueError(f"Wider.new_knob={self.new_knob!r} is invalid: must lie in [0, 1].")

    model = options_model(Wider, "WiderOptions")
    assert model.model_fields["new_knob"].description == "a new option"
    assert model(new_knob=0.25).agl_config() == Wider(new_knob=0.25)
    with pytest.raises(pydantic.ValidationError, match="Wider.new_knob=3.0 is invalid") as info:
        model(new_knob=3)
    assert info.value.errors()[0]["loc"] == ("new_knob",)


@pytest.mark.parametrize("field,value,message", [
    ("rho", 2.0, "AGLConfig.rho=2.0 is invalid"),
    ("lambda_a", -1, "AGLConfig.lambda_a=-1.0 is invalid"),
    ("alpha", 1.5, "AGLConfig.alpha=1.5 is invalid"),
    ("budget", "everything", "AGLConfig.budget='everything' is invalid: must be one of ['global', 'per_module']"),
    ("k_out", 0, "AGLConfig.k_out=0 is invalid"),
    ("warmup_steps", -3, "AGLConfig.warmup_steps=-3 is invalid"),
    ("target_modules", [], "AGLConfig.target_modules=[] is invalid"),
])
def test_bad_values_fail_with_the_field_named(field, value, message):
    (err,) = errors_of({"plugins": PLUGINS, "adapter": "lora", "agl": {field: value}})
    assert err["loc"] == ("agl", field)
    assert message in err["msg"]


def test_types_unknown_keys_and_fisher_bounds_are_checked_too():
    assert errors_of({"agl": {"k_in": 2.5}})[0]["loc"] == ("agl", "k_in")
    assert errors_of({"agl": {"rho": "lots"}})[0]["loc"] == ("agl", "rho")
    (err,) = errors_of({"agl": {"lamda_a": 1.0}})
    assert err["loc"] == ("agl", "lamda_a") and err["type"] == "extra_forbidden"
    for name, low in (("max_examples", 0), ("batch_size", 0), ("max_length", 1), ("max_new_tokens", 0)):
        assert errors_of({"agl": {name: low}})[0]["loc"][:2] == ("agl", name), name
    assert errors_of({"agl": {"max_examples": "some"}})[0]["loc"][:2] == ("agl", "max_examples")


def test_good_values_are_normalised_like_agl_config():
    opts = AGLOptions(k_out=16, target_modules="q_proj, v_proj", rho="0.02", lambda_a=3)
    assert (opts.k_out, opts.target_modules, opts.rho) == (16, ["q_proj", "v_proj"], 0.02)
    assert opts.agl_config() == AGLConfig(k_out=16, target_modules=["q_proj", "v_proj"], rho=0.02, lambda_a=3.0)
    assert AGLOptions(k_out="all").k_out == "all"
    assert opts.agl_config(mask_path="m").mask_path == "m"


def test_dataset_specs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.jsonl").write_text(json.dumps({"prompt": "p", "label": "safe"}) + "\n")
    assert AGLOptions(alignment_dataset="mine.jsonl").alignment_dataset == "mine.jsonl"
    assert AGLOptions(alignment_dataset="builtin:alignment-v1:fisher").alignment_dataset.endswith("fisher")
    bad = {
        "missing.jsonl": "no such file",
        "notes.txt": "use builtin:<name>",
        "builtin:nope": "no prompt set 'nope'",
        "builtin:alignment-v1:eval": "held-out 'eval' split",
    }
    for spec, words in bad.items():
        (err,) = errors_of({"agl": {"alignment_dataset": spec}})
        assert err["loc"] == ("agl", "alignment_dataset") and words in err["msg"], spec
    (err,) = errors_of({"agl": {"reference_dataset": "mine.jsonl"}})
    assert err["loc"] == ("agl",) and "basis: kfac" in err["msg"]
    assert AGLOptions(basis="kfac", reference_dataset="mine.jsonl").reference_dataset == "mine.jsonl"


def test_training_setup_checks_apply_only_when_the_plugin_is_listed():
    (err,) = errors_of({"plugins": PLUGINS, "adapter": None})
    assert "adapter is None; set adapter: lora" in err["msg"]
    (err,) = errors_of({"plugins": PLUGINS, "adapter": "qlora", "deepspeed": "zero2.json"})
    assert "under deepspeed" in err["msg"]
    assert AGLArgs.model_validate({"plugins": ["other.Plugin"], "adapter": None}).agl is None


def test_options_round_trip_through_axolotls_dump():
    # Axolotl validates the YAML, then keeps model_dump(exclude_none=True): the plugin re-reads that dict.
    # So no option may use None for a non-default meaning: max_examples says 'all', alignment_dataset's None is
    # its default (filled in by fisher_options() when no mask_path is set).
    args = AGLArgs.model_validate({"plugins": PLUGINS, "adapter": "lora",
                                   "agl": {"lambda_a": 2.0, "k_out": "all", "max_examples": "all"}})
    opts = options_from_cfg(args.model_dump(exclude_none=True))
    assert opts == args.agl and opts.lambda_a == 2.0 and opts.k_out == "all"
    assert opts.fisher_options()["max_examples"] is None
    assert options_from_cfg({}) == AGLOptions()  # no agl: block → every default
    for name, field in AGLOptions.model_fields.items():
        if field.default is None:  # dropped by the dump, read back as the same default: nothing is lost
            assert getattr(options_from_cfg(AGLOptions(**{name: None}).model_dump(exclude_none=True)), name) is None


def test_fisher_options_default_dataset_only_without_mask_path():
    assert AGLOptions().fisher_options()["alignment_dataset"] == "builtin:alignment-v1"
    assert AGLOptions(mask_path="m/").fisher_options()["alignment_dataset"] is None
    given = AGLOptions(mask_path="m/", alignment_dataset="builtin:alignment-v1").fisher_options()
    assert given["alignment_dataset"] == "builtin:alignment-v1" and given["max_examples"] == 128
