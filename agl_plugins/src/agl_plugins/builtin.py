"""The built-in plugin: registers the core Fisher estimators and the shipped prompt sets."""

from __future__ import annotations

from typing import Any

from agl_core.estimators import BUILTIN_ESTIMATORS

from .hookspecs import hookimpl
from .prompts import alignment_v1


@hookimpl
def agl_fisher_estimators() -> dict[str, Any]:
    """The core estimators ("token", "example"): classes `agl_core.estimate_fisher(estimator=...)` accepts."""
    return dict(BUILTIN_ESTIMATORS)


@hookimpl
def agl_prompt_sets() -> dict[str, Any]:
    """The prompt sets shipped in agl_plugins/data."""
    prompt_set = alignment_v1()
    return {prompt_set.name: prompt_set}
