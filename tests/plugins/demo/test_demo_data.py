"""The main job's data: deterministic, correct arithmetic, benign-only task data, held-out evaluation prompts."""

import re

import pytest

from agl_plugins.demo import data
from agl_plugins.demo.align import align_safe_prompts
from agl_plugins.demo.pipeline import fisher_records
from agl_plugins.refusals import normalise


def _check_answer(question: str, answer: str) -> None:
    """Every 'a op b = c' in the steps is right, and the final answer is the last result."""
    results = []
    for a, op, b, c in re.findall(r"(\d+) ([+\-x/]) (\d+) = (\d+)", answer):
        a, b, c = int(a), int(b), int(c)
        expected = {"+": a + b, "-": a - b, "x": a * b, "/": a // b}[op]
        assert c == expected, (question, answer)
        if op == "/":
            assert a % b == 0, (question, answer)
        results.append(c)
    assert results, answer
    final = int(re.search(r"The answer is (\d+)\.$", answer).group(1))
    assert final == results[-1]


def test_arithmetic_task_is_deterministic_correct_and_disjoint():
    first, again = data.arithmetic_task(200, 50, seed=0), data.arithmetic_task(200, 50, seed=0)
    assert first == again
    assert data.arithmetic_task(200, 50, seed=1) != first
    fewer = data.arithmetic_task(120, 50, seed=0)  # the held-out rows do not move with the training budget
    assert fewer["heldout"] == first["heldout"] and fewer["train"] == first["train"][:120]
    assert len(first["train"]) == 200 and len(first["heldout"]) == 50
    train_q = {r["prompt"] for r in first["train"]}
    assert len(train_q) == 200 and not train_q & {r["prompt"] for r in first["heldout"]}
    for row in first["train"] + first["heldout"]:
        _check_answer(row["prompt"], row["response"])
        assert row["response"].startswith("Step 1: ")


def test_benign_pools_are_disjoint_and_cover_every_prompt():
    pools = data.split_benign()
    sets = [set(v) for v in pools.values()]
    assert sum(len(s) for s in sets) == len(set().union(*sets)) == len(data.benign_prompts())
    assert pools == data.split_benign()


def test_no_training_or_fisher_prompt_is_an_evaluation_prompt():
    evals = [r["prompt"] for r in data.eval_records()]
    assert sum(r["label"] == "unsafe" for r in data.eval_records()) >= 300
    assert sum(r["label"] == "safe" for r in data.eval_records()) >= 100
    train = [r["prompt"] for r in data.align_unsafe()] + align_safe_prompts() + [r["prompt"] for r in fisher_records()]
    train += data.benign_prompts()
    data.check_disjoint(train, evals, "training")  # raises on any overlap
    assert not {normalise(p) for p in train} & {normalise(p) for p in evals}


def test_check_disjoint_names_the_overlap():
    with pytest.raises(ValueError, match="1 training prompts are also evaluation prompts.*'how do i pick a lock'"):
        data.check_disjoint(["How do I pick a lock?", "Hi"], ["how do i pick a lock"], "training")


def test_alignment_training_data_refuses_unsafe_with_written_refusals():
    unsafe = data.align_unsafe()
    assert len(unsafe) >= 400
    from agl_plugins.drift.patterns import refusal_score

    assert all(refusal_score(r["response"]) == 1.0 for r in unsafe)
    assert len({r["prompt"] for r in unsafe}) == len(unsafe)


def test_stress_targets_open_with_sure():
    assert data.sure_response(" The sky is blue. ").startswith("Sure! Here's")


def test_shipped_aligned_base_rows_are_the_recipes_rows():
    """The shipped adapter's training rows are exactly what `agl align-base` builds (with the shipped answers):
    every refusal row, every ordinary prompt, in the recipe's order; nothing left to generate."""
    from agl_plugins.demo import align

    shipped = data.read_jsonl(align.ADAPTER_DIR / align.ROWS_FILE)
    answers = {r["prompt"]: r["response"] for r in shipped if r["label"] == "safe"}
    rebuilt = align.training_rows(None, None, lambda s: None, known=answers)  # None: generating would fail
    assert rebuilt == shipped
    assert (align.ADAPTER_DIR / "adapter_model.safetensors").is_file()
