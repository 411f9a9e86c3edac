"""The built-in plugin: registers the core Fisher estimators, the shipped prompt sets and the DriftCheck judges."""

from __future__ import annotations

from typing import Any

from agl_core.estimators import BUILTIN_ESTIMATORS

from .drift.judges import builtin_judges
from .drift.promptsets import overrefusal_v1
from .hookspecs import hookimpl
from .prompts import alignment_v1


@hookimpl
def agl_fisher_estimators() -> dict[str, Any]:
    """The core estimators ("token", "example"): classes `agl_core.estimate_fisher(estimator=...)` accepts."""
    return dict(BUILTIN_ESTIMATORS)


@hookimpl
def agl_prompt_sets() -> dict[str, Any]:
    """The prompt sets shipped in agl_plugins/data (overrefusal-v1 is evaluation-only)."""
    sets = (alignment_v1(), overrefusal_v1())
    return {prompt_set.name: prompt_set for prompt_set in sets}


@hookimpl
def agl_drift_judges() -> dict[str, Any]:
    """DriftCheck's built-in judges: "pattern" (regex on greedy responses) and "margin" (log-prob margin)."""
    return builtin_judges()
