"""The plugin manager factory and helpers that merge what the registered plugins provide."""

from __future__ import annotations

from typing import Any, Optional

import pluggy

from . import hookspecs


def get_plugin_manager(*, entry_points: bool = True) -> pluggy.PluginManager:
    """A new PluginManager with the agl_ hookspecs and every plugin of the `agl_plugins` entry-point group."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    if entry_points:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    return pm


def plugin_names(pm: pluggy.PluginManager) -> list[str]:
    """Names of the registered (not blocked) plugins, in registration order."""
    return [name for name, plugin in pm.list_name_plugin() if plugin is not None]


def _merge_registrations(pm: pluggy.PluginManager, hook_name: str) -> dict[str, Any]:
    """Call every implementation of a registration hook and merge the dicts; a name given twice is an error."""
    merged: dict[str, Any] = {}
    owner: dict[str, str] = {}
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        result = impl.function()
        if result is None:
            continue
        if not isinstance(result, dict):
            raise ValueError(
                f"Plugin {impl.plugin_name!r} returned {type(result).__name__} from {hook_name}(); "
                "it must return a dict {name: object} (or None)."
            )
        for name, value in result.items():
            if name in merged:
                raise ValueError(
                    f"{hook_name}: the name {name!r} is registered by two plugins, {owner[name]!r} and "
                    f"{impl.plugin_name!r}. Rename one of them or unregister one plugin."
                )
            merged[name] = value
            owner[name] = impl.plugin_name
    return merged


def available_estimators(pm: Optional[pluggy.PluginManager] = None) -> dict[str, Any]:
    """{name: estimator} from every plugin's agl_fisher_estimators()."""
    return _merge_registrations(pm or get_plugin_manager(), "agl_fisher_estimators")


def available_prompt_sets(pm: Optional[pluggy.PluginManager] = None) -> dict[str, Any]:
    """{name: prompt set} from every plugin's agl_prompt_sets()."""
    return _merge_registrations(pm or get_plugin_manager(), "agl_prompt_sets")


def available_judges(pm: Optional[pluggy.PluginManager] = None) -> dict[str, Any]:
    """{name: judge} from every plugin's agl_drift_judges()."""
    return _merge_registrations(pm or get_plugin_manager(), "agl_drift_judges")
