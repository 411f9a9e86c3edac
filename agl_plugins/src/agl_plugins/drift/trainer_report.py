"""`agl report --trainer-state`: plot the AGL training metrics (`agl/*`) and the loss from a trainer_state.json."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .markdown import table

PNG_FILE, MARKDOWN_FILE = "training.png", "training.md"
PLAIN_KEYS = ("loss", "eval_loss")
FIRST_KEYS = PLAIN_KEYS + ("agl/penalty",)  # shown first, the other agl/* keys follow alphabetically


def _wanted(key: str) -> bool:
    return key in PLAIN_KEYS or key.startswith("agl/")


def read_log_history(path: Any) -> list[dict]:
    """`log_history` of a trainer_state.json; ValueError when the file is missing or is not one."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = file / "trainer_state.json"
    if not file.is_file():
        raise ValueError(f"{str(file)!r} does not exist; pass the trainer_state.json that the Trainer writes into "
                         "each checkpoint-*/ folder (or the output folder after trainer.save_state()).")
    try:
        state = json.loads(file.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{str(file)!r} is not valid JSON ({err}); pass a trainer_state.json.") from None
    history = state.get("log_history") if isinstance(state, dict) else None
    if not isinstance(history, list):
        raise ValueError(f"{str(file)!r} has no 'log_history' list, so it is not a trainer_state.json.")
    return history


def collect_series(history: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """{metric: (steps, values)} for the loss and every agl/* key logged with a step and a finite number."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    for entry in history:
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), (int, float)):
            continue
        for key, value in entry.items():
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if _wanted(key) and number and math.isfinite(value):
                steps, values = series.setdefault(key, ([], []))
                steps.append(int(entry["step"]))
                values.append(float(value))
    order = [k for k in FIRST_KEYS if k in series] + sorted(k for k in series if k not in FIRST_KEYS)
    return {k: series[k] for k in order}


def _plot(series: dict[str, tuple[list[int], list[float]]], out: Path, title: str) -> Path:
    from .plots import pyplot

    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(series))
    rows = math.ceil(len(series) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, (key, (steps, values)) in zip(axes.flat, series.items()):
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, linewidth=1.2)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(series):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = out / PNG_FILE
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _markdown(series: dict[str, tuple[list[int], list[float]]], source: str) -> str:
    rows = [[f"`{k}`", str(len(v)), f"{s[0]}–{s[-1]}", *(f"{x:.4g}" for x in (v[0], v[-1], min(v), max(v)))]
            for k, (s, v) in series.items()]
    has_agl = any(k.startswith("agl/") for k in series)
    note = [] if has_agl else ["> **Note:** no `agl/*` metrics were logged: was AGL attached to this run?", ""]
    lines = ["# Training metrics", "", f"From `{source}`.", "", *note,
             *table(["metric", "points", "steps", "first", "last", "min", "max"], rows), "",
             f"![training metrics]({PNG_FILE})", ""]
    return "\n".join(lines)


def trainer_report(trainer_state: Any, out: Any) -> dict[str, Any]:
    """Write training.png and training.md for a trainer_state.json; returns {'metrics': {...}, 'files': [...]}."""
    history = read_log_history(trainer_state)
    series = collect_series(history)
    if not series:
        raise ValueError(f"{str(trainer_state)!r} logs neither a loss nor agl/* metrics (log_history has "
                         f"{len(history)} entries); train with logging_steps set and AGL attached.")
    out_dir = Path(out).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} is a file; pass a folder for the training report.")
    out_dir.mkdir(parents=True, exist_ok=True)
    png = _plot(series, out_dir, f"Training metrics: {Path(str(trainer_state)).name}")
    md = out_dir / MARKDOWN_FILE
    md.write_text(_markdown(series, str(trainer_state)), encoding="utf-8")
    metrics = {k: {"steps": s, "values": v} for k, (s, v) in series.items()}
    return {"metrics": metrics, "files": [str(png), str(md)]}
