"""The `agl forgetting` report: report.json, report.md and forgetting.png, each written atomically."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from agl_core.safeio import atomic_write, atomic_write_bytes

from .analysis import FitOptions, analyse
from .runs import describe, load_runs

FORMAT = "agl-forgetting-report"
VERSION = 1
JSON_FILE, MARKDOWN_FILE, PLOT_FILE = "report.json", "report.md", "forgetting.png"
LAW = "L(D) = L0 + A·D^β (+ E)"
HOW_E = ("E is kept when it lowers AICc (small-sample AIC of the least-squares fit, k = 3 vs 2); with "
         "--residual on/off it is always / never fitted.")


def build_report(specs: list[str], opts: FitOptions, baseline: Optional[str] = None) -> dict[str, Any]:
    grouped = load_runs(specs)
    result = analyse(grouped, opts, baseline)
    return {"format": FORMAT, "version": VERSION, "law": LAW, "x": opts.x, "loss": opts.loss,
            "options": asdict(opts), "residual_rule": HOW_E, "inputs": describe(grouped), **result}


def fmt(value: Optional[float], ci: Optional[list] = None, digits: int = 4) -> str:
    if value is None:
        return "–"
    text = f"{value:.{digits}g}"
    if ci and ci[0] is not None:
        text += f" [{ci[0]:.{digits}g}, {ci[1]:.{digits}g}]"
    return text


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
            *("| " + " | ".join(r) + " |" for r in rows)]


def law_lines(report: dict) -> list[str]:
    conf = int(round(report["options"]["confidence"] * 100))
    rows = []
    for m in report["methods"]:
        f, ci = m["fit"], m["fit"]["ci"]
        rows.append([f"`{m['label']}`", str(m["runs"]), str(len(m["D"]) - 1), fmt(f["L0"]), fmt(f["A"], ci["A"]),
                     fmt(f["beta"], ci["beta"]), fmt(f["E"], ci["E"]) if f["residual"] else "– (dropped)",
                     fmt(f["excess_end"], ci["excess_end"]), fmt(f["rmse"], digits=3)])
    x = "tokens" if report["x"] == "tokens" else "steps"
    return [f"## Fitted law {report['law']} (D = {x}; loss = {report['loss']}; {conf} % bootstrap CI over prompts)",
            "", *_table(["method", "runs", "points", "L0", "A", "β", "E", "L − L0 at D = max", "fit RMSE"], rows),
            "", f"_{report['residual_rule']}_", ""]


def comparison_lines(report: dict) -> list[str]:
    if not report["comparisons"]:
        return []
    rows = [[f"`{c['label']}` − `{c['baseline']}`", fmt(c["A"]["value"], c["A"]["ci"]),
             fmt(c["beta"]["value"], c["beta"]["ci"]), fmt(c["E"]["value"], c["E"]["ci"]),
             fmt(c["excess_end"]["value"], c["excess_end"]["ci"]), "yes" if c["paired"] else "no"]
            for c in report["comparisons"]]
    return ["## Differences against the baseline", "", *_table(["methods", "ΔA", "Δβ", "ΔE", "Δ(L − L0) at D = max",
                                                                  "paired over prompts"], rows), ""]


def seed_lines(report: dict) -> list[str]:
    rows = []
    for m in report["methods"]:
        for k, s in enumerate(m["seeds"]):
            rows.append([f"`{m['label']}`", str(k), f"`{s['path']}`", fmt(s["L0"]), fmt(s["A"], s["ci"]["A"]),
                         fmt(s["beta"], s["ci"]["beta"]), fmt(s["E"]) if s["residual"] else "–",
                         fmt(s["excess_end"])])
    return ["## Per run (seed)", "", *_table(["method", "#", "run", "L0", "A", "β", "E", "L − L0 at D = max"], rows), ""]


def extrapolation_lines(report: dict) -> list[str]:
    rows = []
    for m in report["methods"]:
        e = m.get("extrapolation")
        if e is None:
            continue
        rows.append([f"`{m['label']}` (mean)", f"{e['fit_points']} / {e['test_points']}", fmt(e["rmse"], digits=3),
                     fmt(e["max_abs"], digits=3), fmt(e["rel_excess_error_end"], digits=3),
                     fmt(e["naive_rmse"], digits=3)])
        for k, s in enumerate(m["seeds"]):
            se = s["extrapolation"]
            rows.append([f"`{m['label']}` run {k}", f"{se['fit_points']} / {se['test_points']}",
                         fmt(se["rmse"], digits=3), fmt(se["max_abs"], digits=3),
                         fmt(se["rel_excess_error_end"], digits=3), fmt(se["naive_rmse"], digits=3)])
    if not rows:
        return []
    return ["## Extrapolation (fit on the first half of the points, predict the second half)", "",
            *_table(["curve", "fit / test points", "RMSE (nats)", "max abs error", "rel. error of L − L0 at the end",
                     "RMSE of 'no further change'"], rows), ""]


def render_markdown(report: dict) -> str:
    inputs = "; ".join(f"`{i['label']}`: {len(i['runs'])} run(s)" for i in report["inputs"])
    lines = ["# Forgetting scaling law", "", f"Inputs: {inputs}. Alignment loss = mean token NLL of the base "
             "model's targets (unsafe: refusals, safe: answers); `mean` averages the two groups.", ""]
    lines += law_lines(report) + comparison_lines(report) + extrapolation_lines(report) + seed_lines(report)
    if report["files"].get("plot"):
        lines += [f"![forgetting curves]({report['files']['plot']})", ""]
    return "\n".join(lines)


def _text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_report(report: dict, out: Any, *, plots: bool = True) -> list[Path]:
    """report.json, report.md and (with `plots`) forgetting.png into folder `out`; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["files"] = {"json": JSON_FILE, "markdown": MARKDOWN_FILE, "plot": PLOT_FILE if plots else None}
    written = []
    if plots:
        from .plots import forgetting_plot

        atomic_write(out / PLOT_FILE, lambda tmp: forgetting_plot(report, tmp))
        written.append(out / PLOT_FILE)
    _text(out / JSON_FILE, json.dumps(report, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
    _text(out / MARKDOWN_FILE, render_markdown(report))
    return [out / JSON_FILE, out / MARKDOWN_FILE, *written]
