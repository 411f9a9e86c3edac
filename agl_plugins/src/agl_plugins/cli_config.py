"""argparse options generated from the AGLConfig dataclass fields (help text, types, choices): never hand-copied."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Iterable, Optional

from agl_core.config import AGLConfig, config_fields

_SCALARS = {float: float, int: int, str: str}


def flag(name: str) -> str:
    """Field name → command-line flag: rho → --rho, k_in → --k-in."""
    return "--" + name.replace("_", "-")


def _kind(tp: Any) -> tuple[str, Any]:
    """('scalar', type) | ('list', str) | ('bool', bool) for a field's resolved type hint."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:
        tp = args[0]
    if tp is bool:
        return "bool", bool
    if typing.get_origin(tp) is list:
        return "list", str
    if tp in _SCALARS:
        return "scalar", _SCALARS[tp]
    raise TypeError(f"AGLConfig field type {tp!r} has no command-line form; extend cli_config._kind.")


def add_config_arguments(
    parser: argparse.ArgumentParser, names: Iterable[str], choices: Optional[dict[str, Iterable[str]]] = None
) -> list[str]:
    """Add one option per AGLConfig field in `names` (defaults left to AGLConfig); returns the dests added.

    `choices` overrides a field's declared choices (e.g. estimators registered by plugins).
    """
    wanted = set(names)
    hints = typing.get_type_hints(AGLConfig)
    group = parser.add_argument_group("mask options (AGLConfig fields)")
    added = []
    for f in config_fields():
        if f.name not in wanted:
            continue
        kind, tp = _kind(hints[f.name])
        allowed = (choices or {}).get(f.name, f.metadata.get("choices"))
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")  # argparse %-formats help
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=tp, metavar=f.name.upper())
            if kind == "list":
                kw["nargs"] = "+"
            if allowed is not None:
                kw.update(choices=list(allowed), metavar="{" + ",".join(allowed) + "}")
        group.add_argument(flag(f.name), **kw)
        added.append(f.name)
    return added


def config_kwargs(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The AGLConfig options given on the command line (absent ones keep the dataclass defaults)."""
    given = vars(args)
    return {name: given[name] for name in names if name in given}
