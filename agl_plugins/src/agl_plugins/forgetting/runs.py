"""Reading agl_forgetting.jsonl files into validated runs (steps × prompts NLL matrices), grouped by label."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .probe import GROUPS
from .recorder import FORGET_FILE, ROW_FORMAT

LOSSES = ("mean", "unsafe", "safe")
X_AXES = ("steps", "tokens")


@dataclass
class Run:
    """One training run's measurements: nll[i, j] = alignment loss of prompt j at measurement i."""

    path: str
    label: str
    steps: np.ndarray  # (S,) int, starts at 0, strictly increasing
    tokens: Optional[np.ndarray]  # (S,) tokens seen, or None when the run did not count them
    ids: list[str]
    labels: np.ndarray  # (P,) 'unsafe' | 'safe'
    nll: np.ndarray  # (S, P) float64
    agl_enabled: Optional[bool]

    def groups(self, loss: str) -> list[np.ndarray]:
        """Prompt indices of each group the loss averages: both groups for 'mean', else the one group."""
        wanted = GROUPS if loss == "mean" else (loss,)
        found = [np.flatnonzero(self.labels == g) for g in wanted]
        found = [idx for idx in found if idx.size]
        if not found:
            raise ValueError(f"{self.path}: no {loss!r} prompts were measured; choose another --loss "
                             f"(this run has {sorted(set(self.labels.tolist()))}).")
        return found


def parse_spec(spec: str) -> tuple[str, str]:
    """'name=path' → (name, path); a bare path → (its run folder's name, path)."""
    name, sep, path = spec.partition("=")
    if sep and name and path and not Path(spec).exists():
        return name, path
    p = Path(spec)
    return (p.parent.name if p.suffix == ".jsonl" else p.name) or spec, spec


def resolve(path: str) -> Path:
    """The JSONL file of a run folder (agl_forgetting.jsonl inside it) or a JSONL path; ValueError if missing."""
    p = Path(path)
    if p.is_dir():
        p = p / FORGET_FILE
    if not p.is_file():
        raise ValueError(f"No forgetting measurements at {path!r} (looked for {p}): pass a training output_dir "
                         f"holding {FORGET_FILE} (written by AGLCallback with AGLConfig(forgetting_data=...)) or "
                         "the JSONL file itself.")
    return p


def _rows(path: Path) -> list[tuple[int, dict]]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg}); a half-written last line after a crash "
                             "can be deleted.") from None
        if not isinstance(row, dict) or row.get("format") != ROW_FORMAT:
            raise ValueError(f"{path}:{lineno}: not a forgetting row (no format={ROW_FORMAT!r}).")
        for key in ("step", "ids", "labels", "prompt_nll"):
            if key not in row:
                raise ValueError(f"{path}:{lineno}: the row has no {key!r} field.")
        rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{path} holds no measurements; the run wrote none (did training start?).")
    return rows


def _check_row(path: Path, lineno: int, row: dict, first: dict) -> None:
    if row["ids"] != first["ids"] or row["labels"] != first["labels"]:
        raise ValueError(f"{path}:{lineno}: the prompts differ from the first row's; every row of a run must measure "
                         "the same prompts (was the file written by two runs with different forgetting_data?).")
    values = row["prompt_nll"]
    if len(values) != len(row["ids"]) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise ValueError(f"{path}:{lineno}: step {row['step']} has missing or non-finite per-prompt losses (the "
                         "model overflowed at that step); delete that line to fit the steps before it.")


def load_run(path: str, label: str) -> Run:
    """The validated run in `path` (folder or JSONL); ValueError says what is wrong and how to fix it."""
    file = resolve(path)
    rows = _rows(file)
    first = rows[0][1]
    steps = []
    for lineno, row in rows:
        _check_row(file, lineno, row, first)
        step = row["step"]
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"{file}:{lineno}: step {step!r} is not a non-negative integer.")
        if steps and step <= steps[-1]:
            raise ValueError(f"{file}:{lineno}: step {step} does not increase (the previous row has step {steps[-1]}); "
                             "the steps must be strictly increasing — a file holding two runs? Split it, one per run.")
        steps.append(step)
    if steps[0] != 0:
        raise ValueError(f"{file}: the first measurement is at step {steps[0]}, not 0: L0 (the loss before training) "
                         "is missing. Re-run with the probe from the start (resumed runs keep their step-0 row).")
    labels = np.asarray(first["labels"])
    unknown = sorted(set(labels.tolist()) - set(GROUPS))
    if unknown:
        raise ValueError(f"{file}: unknown prompt label(s) {unknown}; labels must be {list(GROUPS)}.")
    tokens = [row.get("tokens_seen") for _, row in rows]
    has_tokens = all(isinstance(t, int) and t > 0 for t in tokens[1:])
    enabled = first.get("agl_enabled")
    return Run(path=str(file), label=label, steps=np.asarray(steps, dtype=np.int64),
               tokens=np.asarray([0] + tokens[1:], dtype=np.float64) if has_tokens else None, ids=list(first["ids"]),
               labels=labels, nll=np.asarray([row["prompt_nll"] for _, row in rows], dtype=np.float64),
               agl_enabled=enabled if isinstance(enabled, bool) else None)


def load_runs(specs: list[str]) -> dict[str, list[Run]]:
    """{label: runs} in first-seen order from 'name=path' / bare path specs."""
    if not specs:
        raise ValueError("No runs given: pass run folders (or their agl_forgetting.jsonl) and/or --label NAME=PATH.")
    grouped: dict[str, list[Run]] = {}
    seen: dict[str, str] = {}
    for spec in specs:
        label, path = parse_spec(spec)
        run = load_run(path, label)
        if run.path in seen:
            raise ValueError(f"{run.path} is given twice (as {seen[run.path]!r} and {label!r}); pass each run once.")
        seen[run.path] = label
        grouped.setdefault(label, []).append(run)
    return grouped


def common_grid(runs: list[Run], x: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(steps, D, row indices per run) on the steps every run of a label measured; D = steps or mean tokens."""
    label = runs[0].label
    for run in runs[1:]:
        if run.ids != runs[0].ids or not np.array_equal(run.labels, runs[0].labels):
            raise ValueError(f"Runs of label {label!r} measured different prompts ({runs[0].path} vs {run.path}); "
                             "runs aggregated under one label must use the same forgetting_data and max_prompts.")
    steps = runs[0].steps
    for run in runs[1:]:
        steps = np.intersect1d(steps, run.steps)
    rows = [np.searchsorted(run.steps, steps) for run in runs]
    if x == "steps":
        return steps, steps.astype(np.float64), rows
    if any(run.tokens is None for run in runs):
        missing = next(run.path for run in runs if run.tokens is None)
        raise ValueError(f"--x tokens: {missing} has no token counts; train with "
                         "TrainingArguments(include_num_input_tokens_seen=True), or use --x steps.")
    tokens = np.mean([run.tokens[r] for run, r in zip(runs, rows)], axis=0)
    return steps, tokens, rows


def describe(runs: dict[str, list[Run]]) -> list[dict[str, Any]]:
    return [{"label": label, "runs": [r.path for r in rs]} for label, rs in runs.items()]
