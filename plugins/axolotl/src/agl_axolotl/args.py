"""AGLArgs: the `agl:` block of an Axolotl YAML, generated from AGLConfig's dataclass fields plus the Fisher options."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from agl_core.config import AGLConfig, config_fields
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator

PLUGIN_PATH = "agl_axolotl.AGLPlugin"
ARGS_PATH = "agl_axolotl.args.AGLArgs"
DEFAULT_DATASET = "builtin:alignment-v1"
BUILTIN_PREFIX = "builtin:"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
ENGINE_KEYS = ("deepspeed", "fsdp", "fsdp_config")
LORA_ADAPTERS = ("lora", "qlora")

# How a mask is estimated when none exists: the `agl fisher` options (not AGLConfig fields). None must mean the
# default (Axolotl keeps its validated config as model_dump(exclude_none=True), which drops None values).
# name: (annotation, default, help)
AtLeast1 = Annotated[int, Field(ge=1)]
FISHER_OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "alignment_dataset": (Optional[str], None,
                          "Alignment prompts for estimating a mask when none exists: builtin:<name>[:<split>] or a "
                          "local .jsonl/.json/.csv/.parquet file with 'prompt' and 'label' (unsafe|safe) columns. "
                          f"Default: {DEFAULT_DATASET} when agl.mask_path is not set; with mask_path set, a missing "
                          "mask is estimated only when this is given."),
    "reference_dataset": (Optional[str], None,
                          "basis=kfac only: benign prompts whose input covariance makes the contrastive basis."),
    "max_examples": (Union[AtLeast1, Literal["all"]], 128,
                     "Use at most this many alignment examples (round-robin over labels), or 'all'."),
    "batch_size": (AtLeast1, 8, "Examples per forward/backward pass while estimating the mask."),
    "max_length": (Annotated[int, Field(ge=2)], 256, "Tokens per example (prompt + target) while estimating the mask."),
    "max_new_tokens": (AtLeast1, 32, "Length of the greedily generated targets of prompts without a response."),
}


def _annotation(tp: Any) -> Any:
    """A pydantic annotation for an AGLConfig field's type hint; AGLConfig's own checks do the rest.

    A `str` option also takes a YAML number (`k_out: 16`): AGLConfig parses it (or names the field in its error).
    """
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    optional = typing.get_origin(tp) is Union and len(args) == 1
    inner = args[0] if optional else tp
    if inner is str:
        inner = Union[str, int]
    elif typing.get_origin(inner) is list:
        inner = Union[list[str], str]  # AGLConfig also takes "q_proj,v_proj"
    return Optional[inner] if optional else inner


def _config_field_specs(config_cls: type) -> dict[str, tuple[Any, Any]]:
    """name → (annotation, Field) for every field of the config dataclass, help text as the description."""
    hints = typing.get_type_hints(config_cls)
    fields = config_fields() if config_cls is AGLConfig else dataclasses.fields(config_cls)
    specs = {}
    for f in fields:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        specs[f.name] = (_annotation(hints[f.name]), Field(default=default, description=f.metadata.get("help")))
    return specs


def _fisher_field_specs() -> dict[str, tuple[Any, Any]]:
    specs = {}
    for name, (tp, default, help_text) in FISHER_OPTIONS.items():
        specs[name] = (tp, Field(default=default, description=help_text))
    return specs


class _OptionsBase(BaseModel):
    """Validation shared by the generated options model: the config dataclass's own checks, dataset specs."""

    model_config = ConfigDict(extra="forbid", validate_default=True)
    config_cls: ClassVar[type] = AGLConfig

    @field_validator("*", mode="after")
    @classmethod
    def _agl_config_check(cls, value: Any, info: ValidationInfo) -> Any:
        """Run AGLConfig's own check of this one field; its ValueError names the field and the allowed values."""
        if info.field_name in FISHER_OPTIONS:
            return value
        return getattr(cls.config_cls(**{info.field_name: value}), info.field_name)  # normalised (k_out, lists)

    @field_validator("alignment_dataset", "reference_dataset", mode="after", check_fields=False)
    @classmethod
    def _dataset_check(cls, value: Optional[str], info: ValidationInfo) -> Optional[str]:
        return None if value is None else check_dataset_spec(value, info.field_name)

    @model_validator(mode="after")
    def _whole_config(self) -> "_OptionsBase":
        self.agl_config()  # cross-field checks, should AGLConfig gain any
        if self.reference_dataset is not None and self.basis != "kfac":
            raise ValueError("agl.reference_dataset builds the contrastive K-FAC input basis: set agl.basis: kfac, "
                             "or remove agl.reference_dataset.")
        return self

    def agl_config(self, **overrides: Any) -> AGLConfig:
        """The AGLConfig of these options (Fisher options left out), with `overrides` applied."""
        names = [f.name for f in dataclasses.fields(self.config_cls)]
        return self.config_cls(**{**{name: getattr(self, name) for name in names}, **overrides})

    def fisher_options(self) -> dict[str, Any]:
        """The Fisher options as agl_plugins uses them: max_examples None for 'all', the default dataset filled in
        when no mask_path is set (a missing mask_path file is estimated only from an explicit dataset)."""
        opts = {name: getattr(self, name) for name in FISHER_OPTIONS}
        opts["max_examples"] = None if opts["max_examples"] == "all" else opts["max_examples"]
        if opts["alignment_dataset"] is None and not self.mask_path:
            opts["alignment_dataset"] = DEFAULT_DATASET
        return opts


def options_model(config_cls: type = AGLConfig, name: str = "AGLOptions") -> type[BaseModel]:
    """The pydantic model of the `agl:` block, generated from `config_cls`'s dataclass fields (never a hand-kept
    copy) plus FISHER_OPTIONS; every config field is checked by constructing `config_cls` with it."""
    base = type(f"_{name}Base", (_OptionsBase,), {"config_cls": config_cls, "__module__": __name__})
    return create_model(
        name,
        __base__=base,
        __doc__="The `agl:` block: every AGLConfig option (generated from its dataclass fields) plus the Fisher options.",
        __module__=__name__,
        **_config_field_specs(config_cls),
        **_fisher_field_specs(),
    )


AGLOptions = options_model()


def check_dataset_spec(spec: str, field: str) -> str:
    """`builtin:<registered set>[:<split>]` or an existing local data file; ValueError says what to use."""
    spec = spec.strip()
    if spec.startswith(BUILTIN_PREFIX):
        from agl_plugins.manager import available_prompt_sets
        from agl_plugins.prompts import parse_builtin

        name, split = parse_builtin(spec)
        sets = available_prompt_sets()
        if name not in sets:
            raise ValueError(f"agl.{field}={spec!r}: no prompt set {name!r}; registered sets: {sorted(sets)} "
                             f"(write {BUILTIN_PREFIX}<name>, e.g. {DEFAULT_DATASET}).")
        if split == "eval":
            raise ValueError(f"agl.{field}={spec!r} selects the held-out 'eval' split (kept for DriftCheck, never "
                             f"used for masks); use {BUILTIN_PREFIX}{name}.")
        return spec
    path = Path(spec).expanduser()
    if path.suffix.lower() not in DATA_SUFFIXES:
        raise ValueError(f"agl.{field}={spec!r}: use {BUILTIN_PREFIX}<name> (e.g. {DEFAULT_DATASET}) or a local "
                         f"file ending in one of {list(DATA_SUFFIXES)} (Hub datasets are not read).")
    if not path.is_file():
        raise ValueError(f"agl.{field}={spec!r}: no such file (relative paths are read from {str(Path.cwd())!r}).")
    return spec


class AGLArgs(BaseModel):
    """Axolotl input args of AGLPlugin: one `agl:` block (absent: every default, mask estimated when missing)."""

    agl: Optional[AGLOptions] = Field(  # type: ignore[valid-type]
        default=None,
        description="AlignGuard-LoRA (reconstructed) options: AGLConfig fields (mask_path, lambda_a, rho, ...) and "
                    "the options for estimating a mask when none exists (alignment_dataset, max_examples, ...).",
    )

    @model_validator(mode="before")
    @classmethod
    def _check_training_setup(cls, data: Any) -> Any:
        """Fail at validation, not mid-start-up, when the YAML asks AGL for what it cannot do."""
        if not isinstance(data, dict) or not _plugin_listed(data.get("plugins")):
            return data
        adapter = data.get("adapter")
        if adapter not in LORA_ADAPTERS:
            raise ValueError(f"agl: AGLPlugin penalises LoRA updates, but adapter is {adapter!r}; set adapter: lora "
                             "(or qlora), or remove agl_axolotl.AGLPlugin from plugins.")
        engines = [key for key in ENGINE_KEYS if data.get(key)]
        if engines:
            raise ValueError(f"agl: AGL cannot yet guarantee an exact penalty under {engines[0]} (the engine owns or "
                             "shards the LoRA gradients); train without it (single process or plain DDP), or remove "
                             "agl_axolotl.AGLPlugin from plugins.")
        return data


def _plugin_listed(plugins: Any) -> bool:
    return isinstance(plugins, (list, tuple)) and any(str(p).strip() == PLUGIN_PATH for p in plugins)


def options_from_cfg(cfg: Any) -> Any:
    """The validated AGLOptions of an Axolotl cfg (its `agl` entry: a dict after Axolotl's validation, or absent)."""
    raw = cfg.get("agl") if hasattr(cfg, "get") else getattr(cfg, "agl", None)
    if isinstance(raw, AGLOptions):
        return raw
    return AGLOptions.model_validate(dict(raw or {}))
