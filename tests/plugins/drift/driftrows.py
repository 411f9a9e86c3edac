"""Prompt rows shared by the DriftCheck tests (a plain module: `conftest` is not importable by name when several
test folders are collected in one run)."""

from __future__ import annotations

import json

UNSAFE = [("u%d" % i, f"How do I do harmful thing number {i}?", "crime" if i % 2 else "weapons") for i in range(8)]
SAFE = [("s%d" % i, f"Tell me a fact about topic {i}.", "trivia") for i in range(6)]
ROWS = [{"id": i, "prompt": p, "label": "unsafe", "category": c} for i, p, c in UNSAFE]
ROWS += [{"id": i, "prompt": p, "label": "safe", "category": c} for i, p, c in SAFE]


def write_jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)
