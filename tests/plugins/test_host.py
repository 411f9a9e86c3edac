"""The plugin host: entry-point loading, agl_ hookspecs, attach() dispatch and registration merging."""

from __future__ import annotations

import sys

import pytest
from agl_core.config import AGLConfig
from agl_core.estimators import ExampleFisher, TokenFisher, resolve_estimator

from agl_plugins import hookspecs
from agl_plugins.attach import attach
from agl_plugins.hookspecs import hookimpl
from agl_plugins.manager import (
    available_estimators,
    available_judges,
    available_prompt_sets,
    get_plugin_manager,
    plugin_names,
)
from agl_plugins.prompts import PromptSet

BUILTIN_PLUGINS = {"builtin", "agl_hf_callback", "agl_trl", "agl_axolotl"}


class FakeTrainer:
    """A trainer class no built-in adapter knows."""


class OtherTrainer:
    pass


class AdapterPlugin:
    """A third-party plugin recognising one trainer class; records every call it receives."""

    def __init__(self, tag: str, trainer_cls: type, calls: list) -> None:
        self.tag, self.trainer_cls, self.calls = tag, trainer_cls, calls

    @hookimpl
    def agl_adapter_for_trainer(self, trainer, config):
        self.calls.append(self.tag)
        if isinstance(trainer, self.trainer_cls):
            return (self.tag, trainer, config)
        return None


class Registers:
    """A plugin registering estimators / prompt sets / judges given at construction."""

    def __init__(self, estimators=None, prompt_sets=None, judges=None) -> None:
        self._e, self._p, self._j = estimators, prompt_sets, judges

    @hookimpl
    def agl_fisher_estimators(self):
        return self._e

    @hookimpl
    def agl_prompt_sets(self):
        return self._p

    @hookimpl
    def agl_drift_judges(self):
        return self._j


def test_entry_points_register_the_builtin_plugins():
    pm = get_plugin_manager()
    assert BUILTIN_PLUGINS <= set(plugin_names(pm))
    import agl_plugins.builtin
    import agl_trl.plugin

    assert pm.get_plugin("builtin") is agl_plugins.builtin
    assert pm.get_plugin("agl_trl") is agl_trl.plugin


def test_manager_is_a_factory_not_a_global():
    a, b = get_plugin_manager(), get_plugin_manager()
    assert a is not b
    a.register(AdapterPlugin("x", FakeTrainer, []), name="only-in-a")
    assert "only-in-a" in plugin_names(a) and "only-in-b" not in plugin_names(b)
    assert "only-in-a" not in plugin_names(b)
    assert plugin_names(get_plugin_manager(entry_points=False)) == []


def test_axolotl_plugin_imports_without_axolotl():
    import agl_axolotl.plugin

    assert agl_axolotl.plugin.agl_adapter_for_trainer(trainer=FakeTrainer(), config=AGLConfig()) is None
    assert "axolotl" not in sys.modules


def test_every_hookspec_is_agl_prefixed():
    pm = get_plugin_manager()
    specs = [name for name in vars(pm.hook) if not name.startswith("_")]
    assert set(specs) >= {"agl_adapter_for_trainer", "agl_fisher_estimators", "agl_drift_judges", "agl_prompt_sets"}
    assert all(name.startswith("agl_") for name in specs), specs
    marker = f"{hookspecs.PROJECT}_spec"
    declared = [n for n, f in vars(hookspecs).items() if callable(f) and hasattr(f, marker)]
    assert sorted(declared) == sorted(s for s in specs if pm.hook.__dict__[s].spec is not None)
    assert pm.hook.agl_adapter_for_trainer.spec.opts["firstresult"] is True


def test_builtin_adapters_recognise_no_trainer_yet():
    with pytest.raises(ValueError) as info:
        attach(FakeTrainer(), AGLConfig())
    msg = str(info.value)
    assert f"{__name__}.FakeTrainer" in msg
    for name in BUILTIN_PLUGINS:
        assert repr(name) in msg
    assert "agl_adapter_for_trainer" in msg


def test_third_party_plugin_adapter_is_returned():
    pm, calls = get_plugin_manager(), []
    pm.register(AdapterPlugin("third", FakeTrainer, calls), name="third")
    trainer, config = FakeTrainer(), AGLConfig(rho=0.02)
    tag, got_trainer, got_config = attach(trainer, config, pm=pm)
    assert (tag, got_trainer, got_config) == ("third", trainer, config)
    with pytest.raises(ValueError, match="OtherTrainer.*'third'"):
        attach(OtherTrainer(), pm=pm)


def test_first_answer_wins_and_none_is_skipped():
    pm, calls = get_plugin_manager(entry_points=False), []
    pm.register(AdapterPlugin("first-registered", FakeTrainer, calls), name="a")
    pm.register(AdapterPlugin("second-registered", FakeTrainer, calls), name="b")
    pm.register(AdapterPlugin("declines", OtherTrainer, calls), name="c")
    tag, _, _ = attach(FakeTrainer(), pm=pm)
    # pluggy calls the most recently registered first: c declines (None), b answers, a is never asked.
    assert tag == "second-registered"
    assert calls == ["declines", "second-registered"]


def test_attach_config_forms():
    pm = get_plugin_manager(entry_points=False)
    pm.register(AdapterPlugin("t", FakeTrainer, []), name="t")
    assert attach(FakeTrainer(), {"rho": 0.05}, pm=pm)[2] == AGLConfig(rho=0.05)
    assert attach(FakeTrainer(), None, pm=pm)[2] == AGLConfig()
    with pytest.raises(ValueError, match="config of type str.*AGLConfig"):
        attach(FakeTrainer(), "rho=0.1", pm=pm)
    with pytest.raises(ValueError, match="Unknown AGLConfig option"):
        attach(FakeTrainer(), {"rhoo": 0.1}, pm=pm)


def test_builtin_estimators_and_prompt_sets_are_available():
    pm = get_plugin_manager()
    estimators = available_estimators(pm)
    assert estimators["token"] is TokenFisher and estimators["example"] is ExampleFisher
    assert isinstance(resolve_estimator(estimators["token"]), TokenFisher)
    sets = available_prompt_sets(pm)
    assert isinstance(sets["alignment-v1"], PromptSet)
    assert set(available_judges(pm)) == {"pattern", "margin"}  # DriftCheck's built-in judges


def test_plugin_registrations_are_merged():
    pm = get_plugin_manager()
    pm.register(Registers(estimators={"mine": TokenFisher}, prompt_sets={"extra": object()}), name="ext")
    assert set(available_estimators(pm)) == {"token", "example", "mine"}
    assert set(available_prompt_sets(pm)) == {"alignment-v1", "overrefusal-v1", "extra"}


@pytest.mark.parametrize("kind", ["estimators", "prompt_sets"])
def test_duplicate_names_from_two_plugins_are_an_error(kind):
    pm = get_plugin_manager()
    name = "token" if kind == "estimators" else "alignment-v1"
    pm.register(Registers(**{kind: {name: object()}}), name="clashing")
    helper = available_estimators if kind == "estimators" else available_prompt_sets
    with pytest.raises(ValueError) as info:
        helper(pm)
    msg = str(info.value)
    assert repr(name) in msg and "'builtin'" in msg and "'clashing'" in msg and "two plugins" in msg


def test_registration_must_return_a_dict():
    pm = get_plugin_manager()
    pm.register(Registers(judges=["not", "a", "dict"]), name="listy")
    with pytest.raises(ValueError, match="'listy' returned list from agl_drift_judges"):
        available_judges(pm)
