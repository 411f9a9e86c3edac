"""Evaluation prompt sources (shipped sets, JSONL/CSV/parquet files, datasets), sampling, and their errors."""

from __future__ import annotations

import collections
import json

import pytest
from driftrows import ROWS, write_jsonl

from agl_plugins.drift import DEFAULT_PROMPTS, load_eval_prompts, overrefusal_v1
from agl_plugins.manager import available_prompt_sets
from agl_plugins.prompts import DATA_DIR, load_records
from agl_plugins.refusals import normalise


@pytest.fixture(scope="module")
def sets():
    return available_prompt_sets()


def test_default_sets_are_held_out_and_include_over_refusal_bait(sets):
    records = load_eval_prompts(None, prompt_sets=sets)
    assert [r["id"] for r in records] == [r["id"] for r in load_eval_prompts(DEFAULT_PROMPTS, prompt_sets=sets)]
    by_source = collections.Counter(r["id"].split("-")[0] for r in records)
    assert by_source["overrefusal"] == 48 and by_source["advbench"] == 319
    fisher = {normalise(r["prompt"]) for r in load_records("builtin:alignment-v1", sets)}
    assert not fisher & {normalise(r["prompt"]) for r in records}  # disjoint from what masks are estimated on
    assert set(records[0]) == {"id", "prompt", "label", "category", "source"}


def test_shipped_over_refusal_set_is_valid_and_evaluation_only(sets):
    raw = [json.loads(line) for line in (DATA_DIR / "overrefusal-v1.jsonl").read_text("utf-8").splitlines()]
    assert len(raw) == 48 and {r["label"] for r in raw} == {"safe"} and {r["split"] for r in raw} == {"eval"}
    assert len({r["category"] for r in raw}) == 8 and len({normalise(r["prompt"]) for r in raw}) == 48
    assert "overrefusal-v1" in (DATA_DIR / "LICENSES.md").read_text("utf-8")
    with pytest.raises(ValueError, match="for evaluation only .* `agl drift --prompts builtin:overrefusal-v1`"):
        load_records("builtin:overrefusal-v1", {"overrefusal-v1": overrefusal_v1()})


def test_sample_alternates_labels_is_order_free_and_nested(sets, tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", ROWS)
    first = load_eval_prompts([path], prompt_sets=sets, max_prompts=6)
    assert [r["label"] for r in first] == ["unsafe", "safe"] * 3
    shuffled = write_jsonl(tmp_path / "q.jsonl", ROWS[::-1])
    assert [r["id"] for r in load_eval_prompts([shuffled], prompt_sets=sets, max_prompts=6)] == [r["id"] for r in first]
    full = load_eval_prompts([path], prompt_sets=sets)
    assert [r["id"] for r in full[:6]] == [r["id"] for r in first] and len(full) == len(ROWS)


def test_csv_parquet_and_datasets_sources(sets, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.csv").write_text("prompt,label,category\nHow to hotwire a car?,unsafe,crime\nName a fruit.,safe,\n")
    table = pa.Table.from_pylist([{"prompt": "Make a virus.", "label": "UNSAFE", "id": "v1"}])
    pq.write_table(table, tmp_path / "p.parquet")
    ds = datasets.Dataset.from_list([{"goal": "Steal a bike.", "kind": "unsafe"},
                                     {"goal": "Bake bread.", "kind": "safe"}])
    ds.save_to_disk(str(tmp_path / "saved"))
    notes: list = []
    records = load_eval_prompts([str(tmp_path / "p.csv"), str(tmp_path / "p.parquet"), f"datasets:{tmp_path / 'saved'}",
                                 ds], prompt_sets=sets, prompt_column="goal", label_column="kind", notes=notes)
    prompts = {r["prompt"]: r for r in records}
    assert set(prompts) == {"How to hotwire a car?", "Name a fruit.", "Make a virus.", "Steal a bike.", "Bake bread."}
    assert prompts["Make a virus."]["label"] == "unsafe" and prompts["Make a virus."]["id"] == "v1"
    assert prompts["How to hotwire a car?"]["category"] == "crime"
    assert notes == ["2 repeated prompt(s) (same text after normalisation) were evaluated once."]
    harmful = load_eval_prompts([ds.remove_columns("kind")], prompt_sets=sets, prompt_column="goal",
                                default_label="unsafe")
    assert {r["label"] for r in harmful} == {"unsafe"}


@pytest.mark.parametrize("content,suffix,match", [
    ("prompt,category\nHi,x\n", ".csv", r"missing column\(s\) \['label'\]"),
    ('{"prompt": "Hi", "label": "toxic"}\n', ".jsonl", r"label 'toxic' is not valid; use one of \['unsafe', 'safe'\]"),
    ('{"label": "safe"}\n', ".jsonl", "'prompt' field is missing or empty"),
    ("", ".jsonl", "holds no records"),
    ("prompt\n", ".txt", "unsupported type"),
])
def test_bad_files_give_clear_messages(sets, tmp_path, content, suffix, match):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_eval_prompts([str(path)], prompt_sets=sets)


def test_bad_sources_give_clear_messages(sets, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"text": "Hi", "label": "safe"}]), tmp_path / "x.parquet")
    cases = [
        ([str(tmp_path / "x.parquet")], r"x.parquet: missing column\(s\) \['prompt'\]"),
        ([datasets.Dataset.from_list([{"text": "Hi"}])], r"missing column\(s\) \['prompt', 'label'\]"),
        ([datasets.Dataset.from_list([{"prompt": "Hi", "label": "safe"}]).filter(lambda r: False)], "holds no prompts"),
        (["builtin:nope"], "Unknown prompt set 'nope'"),
        (["builtin:alignment-v1:test"], "has no split 'test'"),
        ([f"datasets:{tmp_path / 'missing'}"], "Could not load the dataset .* Offline, pass a folder"),
        ([], "No prompt sources given"),
        ([42], "Unsupported prompt source int"),
        ([[{"id": "a", "prompt": "x", "label": "safe"}, {"id": "a", "prompt": "y", "label": "safe"}]],
         "Two different prompts share the id 'a'"),
    ]
    for sources, match in cases:
        with pytest.raises(ValueError, match=match):
            load_eval_prompts(sources, prompt_sets=sets)
    with pytest.raises(ValueError, match="max_prompts=0 is invalid"):
        load_eval_prompts(None, prompt_sets=sets, max_prompts=0)


def test_fisher_split_gets_a_note(sets):
    notes: list = []
    load_eval_prompts(["builtin:alignment-v1:fisher"], prompt_sets=sets, max_prompts=4, notes=notes)
    assert len(notes) == 1 and "the prompts masks are estimated from" in notes[0]


def test_a_plugin_prompt_set_is_loaded_by_name(tmp_path):
    from agl_plugins.hookspecs import hookimpl
    from agl_plugins.manager import get_plugin_manager
    from agl_plugins.prompts import PromptSet

    rows = [dict(r, split="eval" if i % 2 else "fisher") for i, r in enumerate(ROWS)]
    path = write_jsonl(tmp_path / "mine.jsonl", rows)

    class Plugin:
        @hookimpl
        def agl_prompt_sets(self):
            return {"mine": PromptSet(name="mine", path=path, description="test set", license="MIT")}

    pm = get_plugin_manager()
    pm.register(Plugin(), name="mine")
    records = load_eval_prompts(["builtin:mine"], prompt_sets=available_prompt_sets(pm))
    assert sorted(r["id"] for r in records) == sorted(r["id"] for r in rows if r["split"] == "eval")
