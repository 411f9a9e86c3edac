"""TRL script arguments plus the AGLConfig options as `--agl_<field>`, generated from the AGLConfig dataclass."""

from __future__ import annotations

import dataclasses
import importlib
import typing
from typing import Any, Iterable, Optional

from agl_core import AGLConfig, FisherMask
from agl_core.config import config_fields

PREFIX = "agl_"
SCRIPTS = ("sft", "dpo")
GROUP = "AGL (AlignGuard-LoRA, reconstructed) options; any of them turns AGL on"
FISHER_CMD = "agl fisher --model <base model> --data builtin:alignment-v1 --out <mask folder>"


def _optional(tp: Any) -> Any:
    """Optional[T] for a field's type hint (T unwrapped from an Optional already there)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        tp = args[0]
    return Optional[tp]


def agl_arguments_class() -> type:
    """A new dataclass `AGLArguments` with one field `agl_<name>` per AGLConfig field, default None (= not given).

    Help text and choices come from the AGLConfig field metadata; nothing is listed by hand.
    """
    hints = typing.get_type_hints(AGLConfig)
    specs = []
    for f in config_fields():
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{f.metadata.get('help', '')} Not given: the mask's own value (AGLConfig default {default})."
        meta: dict[str, Any] = {"help": text.replace("%", "%%")}  # argparse %-formats help texts
        if f.metadata.get("choices") is not None:
            meta["choices"] = list(f.metadata["choices"])
        specs.append((PREFIX + f.name, _optional(hints[f.name]), dataclasses.field(default=None, metadata=meta)))
    cls = dataclasses.make_dataclass("AGLArguments", specs)
    cls.__doc__ = "The AGLConfig options as TRL script arguments (None: not given)."
    cls._argument_group_name = GROUP  # HfArgumentParser puts these options in their own --help group
    return cls


def agl_option_names() -> list[str]:
    """Every `--agl_<field>` flag, in AGLConfig field order."""
    return [f"--{PREFIX}{f.name}" for f in config_fields()]


def trl_dataclasses(script: str) -> tuple[type, ...]:
    """The dataclasses TRL's own `trl <script>` parses, read from its `make_parser` (ScriptArguments, *Config, ...)."""
    if script not in SCRIPTS:
        raise ValueError(f"Unknown TRL script {script!r}; agl-trl supports {list(SCRIPTS)}.")
    module = importlib.import_module(f"trl.scripts.{script}")
    return tuple(module.make_parser().dataclass_types)


def name_clashes(script: str) -> list[str]:
    """`agl_*` field names that a TRL dataclass of `script` also declares (must be empty)."""
    ours = {PREFIX + f.name for f in config_fields()}
    theirs = {f.name for dc in trl_dataclasses(script) for f in dataclasses.fields(dc)}
    return sorted(ours & theirs)


def make_parser(script: str, prog: Optional[str] = None) -> Any:
    """TRL's parser for `trl <script>` (same dataclasses, same TrlParser) plus the generated AGLArguments last."""
    from trl import TrlParser

    clashes = name_clashes(script)
    if clashes:
        raise ValueError(f"AGLConfig options {clashes} clash with TRL {script} arguments of the same name; rename "
                         "the AGLConfig field(s) or upgrade agl-trl.")
    return TrlParser((*trl_dataclasses(script), agl_arguments_class()), prog=prog or f"agl-trl {script}")


def unknown_agl_options(*remaining: Iterable[str]) -> list[str]:
    """`--agl_*` / `--agl-*` flags (from the command line or YAML keys) that the parser did not recognise."""
    found = []
    for strings in remaining:
        for token in strings:
            name = str(token).split("=", 1)[0]
            if name.startswith(("--agl_", "--agl-")) and name not in found:
                found.append(name)
    return found


def check_no_unknown_agl(*remaining: Iterable[str]) -> None:
    """ValueError naming the unknown `--agl_*` flags / YAML keys and listing the valid ones."""
    unknown = unknown_agl_options(*remaining)
    if unknown:
        raise ValueError(f"Unknown AGL option(s) {', '.join(unknown)} (command line or `--config` YAML keys). "
                         f"Valid AGL options: {', '.join(agl_option_names())}.")


def given_options(agl_args: Any) -> dict[str, Any]:
    """{AGLConfig field: value} for every `--agl_*` option that was given (on the command line or in YAML)."""
    return {name[len(PREFIX):]: value for name, value in dataclasses.asdict(agl_args).items() if value is not None}


def resolve_config(agl_args: Any) -> Optional[AGLConfig]:
    """The AGLConfig to train with, or None when no `--agl_*` option was given (plain TRL).

    The mask's own config is the base (as `AGLCallback(config=None)` does) and the given options override it.
    Raises ValueError for a missing `--agl_mask_path`, an unreadable mask or an invalid option value.
    """
    given = given_options(agl_args)
    if not given:
        return None
    if given.get("mask_path") is None:
        raise ValueError(f"AGL options were given ({', '.join('--agl_' + k for k in given)}) but no --agl_mask_path: "
                         f"AGL needs a Fisher mask. Create one with: {FISHER_CMD}")
    mask = FisherMask.load(given["mask_path"])  # ValueError naming the file and how to create one
    return AGLConfig.from_dict({**mask.config.to_dict(), **given})
