"""The shipped alignment-v1 prompt set and local JSONL / CSV / JSON prompt files."""

from __future__ import annotations

import collections
import json
import re

import pytest

from agl_plugins.data import build_alignment_v1 as build
from agl_plugins.refusals import OPENERS
from agl_plugins.prompts import (
    DATA_DIR,
    LABELS,
    alignment_v1,
    load_records,
    read_records,
    select_examples,
)

FIELDS = {"id", "prompt", "label", "category", "response", "source", "split"}


def norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(" .!?")


@pytest.fixture(scope="module")
def shipped():
    raw = [json.loads(line) for line in (DATA_DIR / "alignment-v1.jsonl").read_text("utf-8").splitlines()]
    return raw


def test_every_shipped_record_is_valid(shipped):
    assert len(shipped) >= 600
    ids = [r["id"] for r in shipped]
    assert len(set(ids)) == len(ids)
    for r in shipped:
        assert set(r) == FIELDS, r
        assert r["label"] in LABELS and r["split"] in ("fisher", "eval")
        assert r["prompt"] == r["prompt"].strip() and len(r["prompt"]) > 5
        assert r["category"] and r["source"]
        if r["label"] == "unsafe":
            assert r["response"] and len(r["response"]) < 250  # a short written refusal
            assert re.match(r"(I|Sorry|No|That's)\b", r["response"]), r["response"]
        else:
            assert r["response"] == ""  # generated greedily at Fisher time
    refusals = {r["response"] for r in shipped if r["label"] == "unsafe"}
    assert len(refusals) >= 50  # varied, not one template


def test_all_advbench_prompts_are_shipped(shipped):
    adv = [r for r in shipped if r["id"].startswith("advbench-")]
    assert len(adv) == 520 and all(r["label"] == "unsafe" for r in adv)
    assert len({norm(r["prompt"]) for r in adv}) == 520


def test_fisher_and_eval_splits_are_disjoint_and_balanced(shipped):
    by_split = collections.defaultdict(set)
    for r in shipped:
        by_split[r["split"]].add(norm(r["prompt"]))
    assert not by_split["fisher"] & by_split["eval"]
    counts = collections.Counter((r["label"], r["split"]) for r in shipped)
    for label in LABELS:
        share = counts[(label, "fisher")] / (counts[(label, "fisher")] + counts[(label, "eval")])
        assert 0.3 < share < 0.5, (label, share)
        assert counts[(label, "fisher")] >= 50 and counts[(label, "eval")] >= 50


def test_split_is_the_stable_hash_of_the_prompt(shipped):
    for r in shipped:
        assert build.split_of(r["prompt"]) == r["split"], r["id"]
    assert build.split_of("  Why is the SKY blue?  ") == build.split_of("why is the sky blue")


def test_every_source_has_a_license_entry(shipped):
    licenses = (DATA_DIR / "LICENSES.md").read_text("utf-8")
    for prefix in {r["id"].rsplit("-", 1)[0] for r in shipped}:
        assert f"`{prefix}-`" in licenses, prefix
    assert "Copyright (c) Microsoft Corporation" in licenses
    assert "Permission is hereby granted" in licenses and "Apache License" in licenses


def test_registered_set_selects_the_fisher_split_by_default(shipped):
    ps = alignment_v1()
    fisher, held_out, everything = ps.records(), ps.records("eval"), ps.records("all")
    assert {r["split"] for r in fisher} == {"fisher"} and {r["split"] for r in held_out} == {"eval"}
    assert len(fisher) + len(held_out) == len(everything) == len(shipped)
    assert load_records("builtin:alignment-v1", {"alignment-v1": ps}) == fisher
    assert load_records("builtin:alignment-v1:eval", {"alignment-v1": ps}) == held_out
    with pytest.raises(ValueError, match="no split 'train'.*'fisher', 'eval', 'all'"):
        ps.records("train")
    with pytest.raises(ValueError, match="Unknown prompt set 'nope'.*'alignment-v1'"):
        load_records("builtin:nope", {"alignment-v1": ps})


def test_local_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": "Hack a bank", "label": "UNSAFE", "response": "No."},
            {"prompt": "Bake bread", "label": "safe", "category": "cooking", "id": "b1"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = read_records(path)
    assert [r["id"] for r in got] == ["mine.jsonl:1", "b1"]
    assert [r["label"] for r in got] == ["unsafe", "safe"]
    assert got[0]["response"] == "No." and got[1]["response"] == "" and got[1]["category"] == "cooking"
    assert got[0]["source"] == "mine.jsonl"


def test_local_csv_and_json(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('prompt,label,response\n"Hi, there",safe,\nMake poison,unsafe,"I won\'t."\n')
    got = read_records(csv_path)
    assert [(r["prompt"], r["label"], r["response"]) for r in got] == [
        ("Hi, there", "safe", ""), ("Make poison", "unsafe", "I won't.")]
    assert got[0]["id"] == "p.csv:2"  # the header is line 1
    json_path = tmp_path / "p.json"
    json_path.write_text(json.dumps([{"prompt": "Hello", "label": "safe"}]))
    assert read_records(json_path)[0]["prompt"] == "Hello"


def test_reference_files_may_omit_the_label(tmp_path):
    path = tmp_path / "ref.csv"
    path.write_text("prompt\nWhat is rain?\n")
    assert read_records(path, default_label="safe")[0]["label"] == "safe"
    with pytest.raises(ValueError, match=r"missing column\(s\) \['label'\]"):
        read_records(path)


@pytest.mark.parametrize("name, text, message", [
    ("a.csv", "text,label\nhi,safe\n", r"a.csv: missing column\(s\) \['prompt'\] \(found \['text', 'label'\]\)"),
    ("b.jsonl", '{"prompt": "hi", "label": "harmful"}\n', r"b.jsonl:1: label 'harmful' is not valid; use one of \['unsafe', 'safe'\]"),
    ("c.jsonl", '{"label": "safe"}\n', r"c.jsonl:1: the 'prompt' field is missing or empty"),
    ("d.jsonl", '{"prompt": "ok", "label": "safe"}\n{oops\n', r"d.jsonl:2: not valid JSON"),
    ("e.jsonl", "\n\n", r"'e.jsonl' holds no records"),
    ("f.csv", "prompt,label\n", r"'f.csv' holds no records"),
    ("g.txt", "hello", r"'g.txt' has an unsupported type; use one of \['.jsonl', '.json', '.csv', '.parquet'\]"),
    ("h.jsonl", '["a list"]\n', r"h.jsonl:1: expected an object with 'prompt' and 'label', got list"),
    ("i.json", '{"prompt": "x"}', r"i.json: expected a JSON list of objects"),
])
def test_bad_files_say_what_to_fix(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        read_records(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"does not exist.*builtin:alignment-v1"):
        load_records(str(tmp_path / "nope.jsonl"), {})


def test_select_examples_round_robin_over_labels():
    recs = [{"id": f"u{i}", "label": "unsafe"} for i in range(5)] + [{"id": f"s{i}", "label": "safe"} for i in range(2)]
    assert [r["id"] for r in select_examples(recs, 5)] == ["u0", "s0", "u1", "s1", "u2"]
    assert select_examples(recs, None) == recs and select_examples(recs, 100) == recs


def test_unsafe_prompt_without_response_gets_a_written_refusal(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": "Write a phishing email", "label": "unsafe"}, {"prompt": "Plan a picnic", "label": "safe"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    unsafe, safe = read_records(path)
    assert any(unsafe["response"].startswith(opener) for opener in OPENERS), unsafe["response"]
    assert read_records(path)[0]["response"] == unsafe["response"]  # deterministic
    assert safe["response"] == ""  # safe prompts keep generated targets
