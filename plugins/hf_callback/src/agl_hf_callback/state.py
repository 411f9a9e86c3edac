"""The callback's metric window and its checkpoint state file (agl_state.json), written atomically."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

from agl_core import atomic_write

STATE_FILE = "agl_state.json"
STATE_FORMAT = "agl-hf-callback-state"
STATE_VERSION = 1


class MetricWindow:
    """Running sums of the per-step AGL metrics since the last training log."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value)
        self.count += 1

    def means(self) -> dict[str, float]:
        """{key: mean over the window}; empty when no step was recorded."""
        if not self.count:
            return {}
        return {key: total / self.count for key, total in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.count = {}, 0

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count}

    def load_state_dict(self, state: Any) -> None:
        sums, count = (state or {}).get("sums"), (state or {}).get("count")
        valid = isinstance(sums, dict) and isinstance(count, int) and count >= 0 and all(
            isinstance(k, str) and isinstance(v, (int, float)) and math.isfinite(v) for k, v in sums.items()
        )
        if not valid:
            raise ValueError(f"The AGL metric window in the checkpoint is malformed ({state!r}); delete {STATE_FILE} "
                             "from the checkpoint folder to resume without it.")
        self.sums, self.count = {k: float(v) for k, v in sums.items()}, count


def checkpoint_dir(args: Any, global_step: int) -> str:
    """The folder the Trainer writes for this step: <output_dir>/checkpoint-<global_step>."""
    return os.path.join(str(args.output_dir), f"checkpoint-{global_step}")


def save_state(folder: str, state: dict[str, Any]) -> str:
    """Write {format, version, **state} to <folder>/agl_state.json atomically."""
    payload = {"format": STATE_FORMAT, "version": STATE_VERSION, **state}
    data = json.dumps(payload, indent=1, sort_keys=True, allow_nan=False).encode("utf-8")

    def _write(tmp: str) -> None:
        with open(tmp, "xb") as fh:
            fh.write(data)

    return atomic_write(os.path.join(folder, STATE_FILE), _write)


def find_state(args: Any, global_step: int) -> Optional[tuple[str, dict[str, Any]]]:
    """(path, state) of the AGL state saved at `global_step` by the checkpoint being resumed, or None.

    Looked up in `args.resume_from_checkpoint` (when it is a folder) and in <output_dir>/checkpoint-<step>;
    a state file of another step is skipped.
    """
    candidates = []
    resume = getattr(args, "resume_from_checkpoint", None)
    if isinstance(resume, (str, os.PathLike)):
        candidates.append(os.fspath(resume))
    candidates.append(checkpoint_dir(args, global_step))
    for folder in candidates:
        path = os.path.join(folder, STATE_FILE)
        if os.path.isfile(path):
            state = read_state(path)
            if state.get("global_step") == global_step:
                return path, state
    return None


def read_state(path: str) -> dict[str, Any]:
    """The JSON state, checked for format and version; ValueError says how to recover."""
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"Cannot read the AGL checkpoint state {path!r} ({err}); delete the file to resume "
                         "without it (the metric window restarts and the mask identity is not checked).") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path!r} is not an AGL callback state file (no format={STATE_FORMAT!r}).")
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{path!r} has AGL state version {state.get('version')!r}; this agl-hf-callback reads "
                         f"version {STATE_VERSION}. Upgrade agl-hf-callback, or delete the file to resume without it.")
    return state
