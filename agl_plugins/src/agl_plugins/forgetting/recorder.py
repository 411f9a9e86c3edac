"""ForgettingRecorder: what a trainer callback calls to measure the alignment loss on schedule and keep the rows."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from agl_core.safeio import append_durably, atomic_write_bytes

from .probe import ProbeSet, as_metrics, build_probe, log_schedule, measure, summarize

logger = logging.getLogger(__name__)

FORGET_FILE = "agl_forgetting.jsonl"
TARGETS_FILE = "agl_forgetting_targets.json"
ROW_FORMAT = "agl-forgetting"
ROW_VERSION = 1
DEFAULT_SPLIT = "eval"  # held out from Fisher estimation (the 'fisher' split)


@dataclass(frozen=True)
class ForgettingOptions:
    """The probe's settings (AGLConfig's forgetting_* fields)."""

    data: str
    points: int = 12
    max_prompts: int = 64
    targets: str = "missing"
    max_new_tokens: int = 48

    @classmethod
    def from_config(cls, config: Any) -> Optional["ForgettingOptions"]:
        """The options of an AGLConfig, or None when it sets no forgetting_data."""
        data = getattr(config, "forgetting_data", None)
        if not data:
            return None
        return cls(data=data, points=config.forgetting_points, max_prompts=config.forgetting_max_prompts,
                   targets=config.forgetting_targets, max_new_tokens=config.forgetting_max_new_tokens)


def load_probe_records(spec: str, max_prompts: Optional[int], prompt_sets: Optional[dict] = None) -> list[dict]:
    """Validated records of `spec` (builtin:<set>[:<split>], 'eval' split by default, or a data file), cut to
    `max_prompts` alternating unsafe and safe."""
    from ..manager import available_prompt_sets
    from ..prompts import BUILTIN_PREFIX, load_records, select_examples

    if spec.startswith(BUILTIN_PREFIX) and prompt_sets is None:
        prompt_sets = available_prompt_sets()
    try:
        records = load_records(spec, prompt_sets or {}, split=DEFAULT_SPLIT)
    except ValueError as err:
        raise ValueError(f"AGLConfig.forgetting_data={spec!r}: {err}") from None
    return select_examples(records, max_prompts)


def text_tokenizer(processing_class: Any) -> Any:
    """The tokenizer inside a processor (multimodal processing classes), else the object itself."""
    inner = getattr(processing_class, "tokenizer", None)
    return inner if inner is not None and callable(inner) else processing_class


def append_line(path: Path, row: dict) -> None:
    """Append one JSON line with a single write, then fsync: after a crash the row is there or it is not."""
    append_durably(path, (json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))


def _json_float(value: Any) -> Optional[float]:
    return float(value) if value is not None and math.isfinite(value) else None


class ForgettingRecorder:
    """Measures the alignment loss at the steps of `log_schedule(max_steps, points)` and appends one row per
    measurement to <output_dir>/agl_forgetting.jsonl (on the main process only; others only keep the schedule)."""

    def __init__(self, options: ForgettingOptions, prompt_sets: Optional[dict] = None) -> None:
        self.options = options
        self.records = load_probe_records(options.data, options.max_prompts, prompt_sets)  # bad data fails now
        self.schedule: list[int] = []
        self._due: set[int] = set()
        self.probe: Optional[ProbeSet] = None
        self.path: Optional[Path] = None
        self.meta: dict[str, Any] = {}
        self.tokenizer: Any = None
        self.batch_size = 8

    def due(self, step: int) -> bool:
        return step in self._due

    def start(self, model: Any, tokenizer: Any, *, output_dir: str, max_steps: int, global_step: int,
              is_main: bool, agl_enabled: bool, batch_size: int = 8) -> dict[str, float]:
        """Set the schedule; on the main process build the probe and measure step 0 (a fresh run). Returns the
        step-0 metrics ({} when not measured here)."""
        self.schedule = log_schedule(int(max_steps), self.options.points)
        self._due = set(self.schedule)
        if not is_main:
            return {}
        if tokenizer is None:
            raise ValueError("AGLConfig.forgetting_data needs the tokenizer: pass processing_class=<tokenizer> to "
                             "the Trainer (or tokenizer= to AGLCallback).")
        self.tokenizer, self.batch_size = text_tokenizer(tokenizer), max(1, int(batch_size))
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / FORGET_FILE
        self.meta = {"data": self.options.data, "max_steps": int(max_steps), "agl_enabled": bool(agl_enabled),
                     "targets": self.options.targets}
        self.probe = self._load_targets(folder, global_step) or self._new_targets(model, folder)
        self._keep_rows_until(global_step)
        if global_step == 0:
            return self.record(model, 0, epoch=0.0, tokens_seen=None)
        return {}

    def record(self, model: Any, step: int, *, epoch: Optional[float], tokens_seen: Optional[int]) -> dict[str, float]:
        """Measure now, append the row, return the agl/forget_* metrics (main process only)."""
        if self.probe is None or self.path is None:
            return {}
        t0 = time.perf_counter()
        nll = measure(model, self.probe, self.tokenizer, self.batch_size)
        summary = summarize(self.probe.labels, nll)
        row = {"format": ROW_FORMAT, "version": ROW_VERSION, "step": int(step), "epoch": _json_float(epoch),
               "tokens_seen": int(tokens_seen) if tokens_seen else None, **self.meta,
               **{k: _json_float(v) for k, v in summary.items()},
               "ids": self.probe.ids, "labels": self.probe.labels, "prompt_nll": [_json_float(v) for v in nll],
               "seconds": round(time.perf_counter() - t0, 3)}
        append_line(self.path, row)
        if not np.all(np.isfinite(nll)):
            logger.warning("AGL forgetting: step %d: the alignment loss is not finite for %d prompt(s) (the model "
                           "overflowed); `agl forgetting` will refuse this row.", step, int((~np.isfinite(nll)).sum()))
        logger.info("AGL forgetting: step %d: alignment NLL %s (unsafe %s, safe %s) in %.1f s", step,
                    *(f"{v:.4f}" if v is not None else "-" for v in (summary["nll"], summary["unsafe_nll"],
                                                                  summary["safe_nll"])), row["seconds"])
        return as_metrics({k: v for k, v in summary.items() if v is not None and math.isfinite(v)})

    # ----- targets and rows across resumes -----

    def _new_targets(self, model: Any, folder: Path) -> ProbeSet:
        probe = build_probe(model, self.tokenizer, self.records, generate=self.options.targets,
                            max_new_tokens=self.options.max_new_tokens, batch_size=self.batch_size)
        decode = getattr(self.tokenizer, "decode", None)
        saved = {"format": "agl-forgetting-targets", "data": self.options.data, "targets": self.options.targets,
                 "ids": probe.ids, "labels": probe.labels, "prompt_ids": probe.prompt_ids,
                 "target_ids": probe.target_ids,
                 "target_text": [decode(t, skip_special_tokens=True) if decode else None for t in probe.target_ids]}
        atomic_write_bytes(folder / TARGETS_FILE, json.dumps(saved, ensure_ascii=False).encode("utf-8"))
        return probe

    def _load_targets(self, folder: Path, global_step: int) -> Optional[ProbeSet]:
        """On a resume, the targets the run started with (same data, same prompts), else None."""
        path = folder / TARGETS_FILE
        if global_step == 0 or not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        same = (saved.get("data"), saved.get("targets"), saved.get("ids")) == (
            self.options.data, self.options.targets, [r["id"] for r in self.records])
        if not same:
            logger.warning("AGL forgetting: %s belongs to other data; generating the targets again.", path)
            return None
        return ProbeSet(saved["ids"], saved["labels"], saved["prompt_ids"], saved["target_ids"])

    def _keep_rows_until(self, global_step: int) -> None:
        """A fresh run starts an empty file; a resume keeps the rows up to its step (later ones were undone)."""
        assert self.path is not None
        kept = b""
        if global_step > 0 and self.path.is_file():
            lines = self.path.read_bytes().splitlines(keepends=True)
            kept = b"".join(line for line in lines if _step_of(line) is not None and _step_of(line) <= global_step)
        elif self.path.is_file() and self.path.stat().st_size:
            logger.warning("AGL forgetting: a new run replaces the measurements in %s.", self.path)
        atomic_write_bytes(self.path, kept)


def _step_of(line: bytes) -> Optional[int]:
    try:
        step = json.loads(line).get("step")
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) else None
