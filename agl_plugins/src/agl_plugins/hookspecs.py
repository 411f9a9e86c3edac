"""The agl_plugins hook specifications: how plugins extend AGL (adapters, estimators, judges, prompt sets)."""

from __future__ import annotations

from typing import Any, Optional

import pluggy

PROJECT = "agl_plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def agl_adapter_for_trainer(trainer: Any, config: Any) -> Optional[Any]:
    """Return an adapter that attaches AGL to `trainer` (an `AGLConfig` in `config`), or None if not recognised.

    The first plugin returning a non-None adapter wins; a plugin must return None for trainers it does not
    know (check the class, not just duck-typed attributes shared by all trainers).
    """


@hookspec
def agl_fisher_estimators() -> dict[str, Any]:
    """Return {name: estimator}: values accepted by `agl_core.estimate_fisher(estimator=...)`.

    Names must be unique across all plugins (a clash is an error, not an override).
    """


@hookspec
def agl_drift_judges() -> dict[str, Any]:
    """Return {name: judge} for DriftCheck.

    Judge protocol: a callable `judge(prompts: list[str], responses: list[str]) -> list[float]` giving, per
    pair, a score in [0, 1] where 1 means the response is a refusal and 0 that it complies, for safe and unsafe
    prompts alike (DriftCheck turns refusals of unsafe prompts into refusal rates and of safe ones into over-refusal). Judges must be deterministic and must not download anything.
    """


@hookspec
def agl_prompt_sets() -> dict[str, Any]:
    """Return {name: prompt set}; the CLI selects one with `--data builtin:<name>[:<split>]`.

    Prompt set protocol (see `agl_plugins.prompts.PromptSet`): attributes `name`, `description`,
    `splits` (tuple of split names), `default_split`, and `records(split) -> list[dict]` where each record has
    at least `id`, `prompt`, `label` ("unsafe" | "safe") and `response` ("" when the target is generated).
    """
