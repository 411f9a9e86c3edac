"""The DriftCheck report: a JSON document with a stable schema, written with its Markdown summary and plots."""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from .loading import BASE
from .metrics import compute_tables
from .stats import Bootstrap
from .store import RESULTS_FILE, ResultStore, load_run

SCHEMA_VERSION = 1
JSON_FILE, MARKDOWN_FILE = "report.json", "report.md"


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("agl-plugins")
    except Exception:  # run from a source tree without installation
        return "unknown"


def _prompt_summary(rows: list[dict]) -> dict[str, Any]:
    """Prompt counts over every judged prompt: total, per label and per label × category."""
    prompts = {r["id"]: (r["label"], r["category"] or "(none)") for r in rows}
    labels = Counter(label for label, _ in prompts.values())
    cats: dict[str, dict[str, int]] = {}
    for label, cat in sorted(prompts.values()):
        cats.setdefault(label, {})[cat] = cats.get(label, {}).get(cat, 0) + 1
    return {"n": len(prompts), "unsafe": labels.get("unsafe", 0), "safe": labels.get("safe", 0), "categories": cats}


def _models(settings: dict, reference: str, compare: Optional[dict[str, str]]) -> list[dict]:
    roles = {name: role for role, name in (compare or {}).items()}
    roles.setdefault(reference, "reference")
    models = [{"name": BASE, "adapter": None}]
    models += [{"name": n, "adapter": a["path"]} for n, a in settings["adapters"].items()]
    for m in models:
        m["role"] = "reference" if m["name"] == reference else roles.get(m["name"])
    return models


def build_report(store: ResultStore, *, reference: str = BASE, compare: Optional[dict[str, str]] = None,
                 resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The report dict (schema_version 1) from a results folder; every number names the judge behind it."""
    settings, rows = store.settings, store.rows()
    info = load_run(store.out).get("info") or {}
    models = [BASE, *settings["adapters"]]
    judges = [(name, cfg["kind"]) for name, cfg in settings["judges"].items()]
    boot = Bootstrap(resamples=resamples, seed=seed)
    tables, datas = compute_tables(rows, models, judges, reference=reference, compare=compare, boot=boot)
    warnings = list(info.get("warnings") or [])
    descriptions = info.get("judges") or {}
    judge_entries = []
    for data in datas:
        if data.missing:
            warnings.append(f"Judge {data.judge!r}: {data.missing} prompt(s) were judged for some models only and "
                            "are left out (re-run the same command to finish them).")
        judge_entries.append({"name": data.judge, "kind": data.kind, "description": descriptions.get(data.judge, ""),
                              "n_prompts": len(data.ids), "settings": settings["judges"][data.judge]})
    return {
        "schema_version": SCHEMA_VERSION,
        "generated_by": f"agl_plugins DriftCheck {_version()}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": settings,
        "models": _models(settings, reference, compare),
        "reference": reference,
        "compare": compare,
        "judges": judge_entries,
        "prompts": _prompt_summary(rows),
        "bootstrap": {"method": "percentile", "unit": "prompt", "paired_across_models": True,
                      "resamples": boot.resamples, "seed": boot.seed, "confidence": boot.confidence},
        "metrics": tables.metrics,
        "drift": tables.drift,
        "drift_reduction": tables.drift_reduction,
        "warnings": warnings,
        "files": {"results": RESULTS_FILE, "json": JSON_FILE, "markdown": MARKDOWN_FILE, "plots": []},
    }


def report_from_folder(out: Any, *, reference: str = BASE, compare: Optional[dict[str, str]] = None,
                       resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Rebuild the report of a DriftCheck folder from its results (no model needed)."""
    store = ResultStore(out, load_run(out)["settings"])
    if not store.rows():
        raise ValueError(f"{str(out)!r} holds no results yet; run `agl drift --out {out}` (same settings) first.")
    return build_report(store, reference=reference, compare=compare, resamples=resamples, seed=seed)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_reports(report: dict[str, Any], out: Any, rows: list[dict], *, plots: bool = True) -> list[Path]:
    """report.json, report.md and (with `plots`) the PNGs into `out`; `rows` are the result rows (margin plots)."""
    from .markdown import render_markdown

    out = Path(out)
    written: list[Path] = []
    if plots:
        from .plots import drift_plots

        written = drift_plots(report, rows, out)
        report["files"]["plots"] = [p.name for p in written]
    _atomic_text(out / JSON_FILE, json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    _atomic_text(out / MARKDOWN_FILE, render_markdown(report))
    return [out / JSON_FILE, out / MARKDOWN_FILE, *written]
