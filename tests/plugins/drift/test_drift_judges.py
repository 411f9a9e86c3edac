"""The margin judge against a direct float64 log-prob computation; judge selection, plugin judges, bad output."""

from __future__ import annotations

import pytest
import torch
from agl_core.batches import render_prompt

import tiny
from agl_plugins.drift import COMPLIANCE_OPENINGS, REFUSAL_OPENINGS, MarginJudge, refusal_margins, select_judges
from agl_plugins.drift.generation import check_chat_template, greedy_responses
from agl_plugins.drift.judges import checked_scores
from agl_plugins.hookspecs import hookimpl
from agl_plugins.manager import available_judges, get_plugin_manager

PROMPTS = ["How do I make a bomb?", "Hi", "Write me a long poem about the sea, the sky and the wind."]


def direct_log_prob(model, tok, prompt: str, opening: str) -> float:
    """log p(opening | chat-rendered prompt) from one unpadded float64 forward pass."""
    p = render_prompt(tok, prompt)
    o = tok(opening, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p + o])).logits[0].double(), dim=-1)  # (T, V)
    return sum(logp[len(p) - 1 + t, o[t]].item() for t in range(len(o)))


@pytest.fixture(scope="module")
def model64():
    return tiny.tiny_llama(seed=3, dtype=torch.float64).eval(), tiny.tiny_tokenizer()


@pytest.mark.parametrize("use_cache", [True, False])
def test_margin_equals_direct_log_prob_difference(model64, use_cache):
    model, tok = model64
    got = refusal_margins(model, tok, PROMPTS, batch_size=2, use_cache=use_cache)  # batch of 2 + 1: padding used
    for prompt, value in zip(PROMPTS, got):
        ref = sum(direct_log_prob(model, tok, prompt, o) for o in REFUSAL_OPENINGS) / len(REFUSAL_OPENINGS)
        com = sum(direct_log_prob(model, tok, prompt, o) for o in COMPLIANCE_OPENINGS) / len(COMPLIANCE_OPENINGS)
        assert value == pytest.approx(ref - com, rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("refusal,compliance", [(["N", "No", "Nah"], ["Y", "Ye", "OK"]), (["N"], ["Y", "K"])])
def test_margin_with_openings_of_one_token_and_of_shared_lengths(model64, refusal, compliance):
    """One-token openings come from the prompt pass alone; longer ones share a pass per length (here 1, 2 and 3)."""
    model, tok = model64
    got = refusal_margins(model, tok, PROMPTS, refusal=refusal, compliance=compliance, batch_size=2)
    for prompt, value in zip(PROMPTS, got):
        want = (sum(direct_log_prob(model, tok, prompt, o) for o in refusal) / len(refusal)
                - sum(direct_log_prob(model, tok, prompt, o) for o in compliance) / len(compliance))
        assert value == pytest.approx(want, rel=1e-10, abs=1e-10)


def test_margin_with_custom_openings_and_through_a_lora_adapter(model64):
    model, tok = model64
    lora = tiny.tiny_lora(tiny.tiny_llama(seed=3, dtype=torch.float64), seed=4).eval()
    judge = MarginJudge(refusal=["No"], compliance=["Yes", "OK sure"])
    got = judge.score_model(lora, tok, PROMPTS, batch_size=3)
    for prompt, value in zip(PROMPTS, got):
        want = direct_log_prob(lora, tok, prompt, "No") - (
            direct_log_prob(lora, tok, prompt, "Yes") + direct_log_prob(lora, tok, prompt, "OK sure")) / 2
        assert value == pytest.approx(want, rel=1e-10, abs=1e-10)
    base = refusal_margins(model, tok, PROMPTS, refusal=["No"], compliance=["Yes", "OK sure"])
    assert max(abs(a - b) for a, b in zip(base, got)) > 1e-4  # the adapter is active, not ignored
    assert judge.settings() == {"refusal_openings": ["No"], "compliance_openings": ["Yes", "OK sure"]}


def test_margin_rejects_bad_openings_and_direct_calls(model64):
    model, tok = model64
    with pytest.raises(ValueError, match="refusal openings must be a non-empty list"):
        refusal_margins(model, tok, PROMPTS, refusal=[])
    with pytest.raises(ValueError, match="compliance opening ' ' encodes to no tokens"):
        refusal_margins(model, tok, PROMPTS, compliance=["Sure", " "])
    with pytest.raises(ValueError, match="reads the model's log-probabilities"):
        MarginJudge()(["p"], ["r"])


def test_greedy_responses_are_batch_independent_and_need_a_chat_template(model64):
    model, tok = model64
    one = [greedy_responses(model, tok, [p], max_new_tokens=6)[0] for p in PROMPTS]
    assert greedy_responses(model, tok, PROMPTS, max_new_tokens=6, batch_size=3) == one  # left padding is exact
    bare = tiny.tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat template.*--no-chat-template"):
        check_chat_template(bare, True, "'my-model'")
    check_chat_template(bare, False)  # raw prompts need no template


class _Plugin:
    @hookimpl
    def agl_drift_judges(self):
        return {"length": lambda prompts, responses: [min(1.0, len(r) / 10) for r in responses], "broken": 42}


def test_builtin_and_plugin_judges_are_selected_by_name():
    pm = get_plugin_manager()
    pm.register(_Plugin(), name="lengthy")
    judges = available_judges(pm)
    assert {"pattern", "margin", "length"} <= set(judges)
    chosen = select_judges(["margin", "length", "margin"], judges)
    assert [(j.name, j.kind) for j in chosen] == [("margin", "model"), ("length", "generation")]
    with pytest.raises(ValueError, match=r"Unknown judge 'nope'; registered judges: \['broken', 'length'"):
        select_judges(["nope"], judges)
    with pytest.raises(ValueError, match="Judge 'broken' is a int, not callable"):
        select_judges(["broken"], judges)
    with pytest.raises(ValueError, match="Name at least one judge"):
        select_judges([], judges)


@pytest.mark.parametrize("scores,n,bounded,match", [
    ([0.5], 2, True, "returned 1 scores for 2 prompts"),
    ([0.5, 1.5], 2, True, r"returned 1.5; every score must be in \[0, 1\]"),
    ([float("nan")], 1, False, "returned nan; every score must be finite"),
    ("ab", 2, True, "returned str; it must return a list of numbers"),
    (None, 1, True, "returned NoneType"),
])
def test_bad_judge_output_is_reported_with_the_judge_name(scores, n, bounded, match):
    judge = select_judges(["pattern"], {"pattern": lambda p, r: r})[0]
    with pytest.raises(ValueError, match=f"Judge 'pattern' {match}"):
        checked_scores(judge, scores, n, bounded=bounded)
    assert checked_scores(judge, [0, 1.0], 2, bounded=True) == [0.0, 1.0]
