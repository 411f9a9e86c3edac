"""agl_plugins: the AGL plugin host (pluggy), the `agl` CLI and DriftCheck."""

from .attach import attach
from .hookspecs import hookimpl, hookspec
from .manager import available_estimators, available_judges, available_prompt_sets, get_plugin_manager
from .models import load_model_and_tokenizer
from .prompts import PromptSet, load_records

__all__ = [
    "PromptSet",
    "attach",
    "available_estimators",
    "available_judges",
    "available_prompt_sets",
    "get_plugin_manager",
    "hookimpl",
    "hookspec",
    "load_model_and_tokenizer",
    "load_records",
]
