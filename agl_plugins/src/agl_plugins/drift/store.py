"""Resumable DriftCheck results: `run.json` (the settings) and `results.jsonl` (one row per model, prompt, judge)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from agl_core.safeio import append_durably

log = logging.getLogger("agl_plugins.drift")

RUN_FILE = "run.json"
RESULTS_FILE = "results.jsonl"
RUN_FORMAT = "agl-drift-run"


def key_of(row: dict) -> tuple[str, str, str]:
    """What a result row is unique by: (model, judge, prompt id)."""
    return (row["model"], row["judge"], row["id"])


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for k, v in value.items():
            flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return flat
    return {prefix: value}


def settings_diff(old: dict, new: dict) -> list[str]:
    """Human-readable differences 'key: old → new' between two settings dicts."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {json.dumps(a.get(k))} → {json.dumps(b.get(k))}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


class ResultStore:
    """The results folder of one DriftCheck run; a re-run with the same settings continues where it stopped."""

    def __init__(self, out: Any, settings: dict, *, overwrite: bool = False) -> None:
        self.out = Path(out).expanduser()
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out {str(self.out)!r} is a file; pass a folder for the DriftCheck results.")
        self.out.mkdir(parents=True, exist_ok=True)
        self.run_file, self.results_file = self.out / RUN_FILE, self.out / RESULTS_FILE
        self.settings = json.loads(json.dumps(settings))  # JSON round trip: tuples → lists, as they are stored
        if overwrite:
            for f in (self.results_file, self.run_file):
                f.unlink(missing_ok=True)
        self._check_or_write_settings()
        self._rows = self._read()

    def _check_or_write_settings(self) -> None:
        if self.run_file.is_file():
            stored = load_run(self.out)
            diff = settings_diff(stored["settings"], self.settings)
            if diff:
                shown = "; ".join(diff[:4]) + (f"; +{len(diff) - 4} more" if len(diff) > 4 else "")
                raise ValueError(f"{str(self.out)!r} holds results of a run with different settings ({shown}). "
                                 "Use a new --out folder, or --overwrite to discard the old results.")
            return
        if self.results_file.is_file():
            raise ValueError(f"{str(self.results_file)!r} exists without {RUN_FILE}, so its settings are unknown; "
                             "use a new --out folder, or --overwrite to discard it.")
        self.write_info({})

    def write_info(self, info: dict) -> None:
        """(Re)write run.json: the settings (fixed for the folder) and `info` (judge descriptions, warnings)."""
        tmp = self.run_file.with_suffix(".json.tmp")
        body = {"format": RUN_FORMAT, "settings": self.settings, "info": info}
        tmp.write_text(json.dumps(body, indent=1, ensure_ascii=False) + "\n", "utf-8")
        os.replace(tmp, self.run_file)

    def _read(self) -> dict[tuple[str, str, str], dict]:
        if not self.results_file.is_file():
            return {}
        data = self.results_file.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):  # a run killed mid-write left a partial last line: drop it, it is redone
            log.warning("Dropping an incomplete last line of %s (an interrupted write); it is evaluated again.",
                        self.results_file)
            with self.results_file.open("r+b") as handle:
                handle.truncate(complete)
        rows: dict[tuple[str, str, str], dict] = {}
        for lineno, line in enumerate(data[:complete].decode("utf-8").splitlines(), start=1):
            try:
                row = json.loads(line)
                rows.setdefault(key_of(row), row)
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{str(self.results_file)!r} line {lineno} is damaged (not a result row); use "
                                 "--overwrite to start the run again.") from None
        return rows

    def has(self, model: str, judge: str, prompt_id: str) -> bool:
        return (model, judge, prompt_id) in self._rows

    def rows(self) -> list[dict]:
        """Every stored row, in the order written."""
        return list(self._rows.values())

    def append(self, rows: Iterable[dict]) -> None:
        """Append rows with a single write and flush to disk: after a kill, a batch is there or it is not."""
        new = [r for r in rows if key_of(r) not in self._rows]
        if not new:
            return
        payload = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in new).encode("utf-8")
        append_durably(self.results_file, payload)
        for r in new:
            self._rows[key_of(r)] = r


def load_run(out: Any) -> dict:
    """run.json of a DriftCheck folder; ValueError when the folder holds none or it is damaged."""
    file = Path(out).expanduser() / RUN_FILE
    if not file.is_file():
        raise ValueError(f"{str(Path(out))!r} holds no DriftCheck run ({RUN_FILE} missing); run `agl drift --out "
                         f"{out}` first.")
    try:
        run = json.loads(file.read_text("utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(file)!r} is not valid JSON ({err.msg}); use --overwrite to start again.") from None
    if not isinstance(run, dict) or run.get("format") != RUN_FORMAT or not isinstance(run.get("settings"), dict):
        raise ValueError(f"{str(file)!r} is not a DriftCheck run file; use another --out folder.")
    return run


# What every row of a run depends on besides its model and judge: rows of another folder are reusable only if these agree.
SHARED_SETTINGS = ("model_dir", "prompts", "max_new_tokens", "chat_template")


def reusable_rows(folder: Any, settings: dict, base: str) -> tuple[list[dict], str]:
    """Rows of an earlier DriftCheck folder that this run (`settings`) would compute identically, and a line saying
    what was reused or why nothing was: the same base weights, prompt sample, generation settings; per judge the
    same judge settings; per model the base (`base`) or an adapter with the same name and the same file digest."""
    old = load_run(folder)["settings"]
    differ = [k for k in SHARED_SETTINGS if old.get(k) != settings.get(k)]
    if differ:
        return [], f"{str(folder)!r}: nothing reused ({', '.join(differ)} differ)"
    judges = {j for j, s in settings.get("judges", {}).items() if old.get("judges", {}).get(j) == s}
    models = {base} | {n for n, a in settings.get("adapters", {}).items()
                       if old.get("adapters", {}).get(n, {}).get("sha256") == a.get("sha256")}
    results = Path(folder).expanduser() / RESULTS_FILE
    rows = []
    if results.is_file():
        data = results.read_bytes()
        for line in data[:data.rfind(b"\n") + 1].decode("utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a damaged line is simply not reused; this run evaluates that prompt itself
            if isinstance(row, dict) and row.get("model") in models and row.get("judge") in judges:
                rows.append(row)
    names = sorted({r["model"] for r in rows})
    return rows, f"{str(folder)!r}: reused {len(rows)} rows of {', '.join(names) or 'no model'}"
