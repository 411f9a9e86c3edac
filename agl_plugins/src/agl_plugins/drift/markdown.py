"""The Markdown summary of a DriftCheck report: tables per model and judge, drift, drift reduction, categories."""

from __future__ import annotations

from typing import Any, Iterable, Optional

LABELS = {"refusal_rate": "refusal rate (unsafe)", "over_refusal_rate": "over-refusal rate (safe)",
          "mean_margin_unsafe": "mean margin (unsafe)", "mean_margin_safe": "mean margin (safe)"}
MAIN_METRICS = tuple(LABELS)


def fmt(value: Optional[float], low: Optional[float] = None, high: Optional[float] = None, signed: bool = False) -> str:
    """'0.812 [0.765, 0.853]' (signed: '+0.120 [...]'); '–' for a missing value."""
    if value is None:
        return "–"
    spec = "+.3f" if signed else ".3f"
    text = format(value, spec)
    if low is not None and high is not None:
        text += f" [{format(low, spec)}, {format(high, spec)}]"
    return text


def table(headers: list[str], rows: Iterable[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def _find(entries: list[dict], **match: Any) -> Optional[dict]:
    return next((e for e in entries if all(e.get(k) == v for k, v in match.items())), None)


def _cell(entry: Optional[dict], signed: bool = False, with_n: bool = True) -> str:
    if entry is None:
        return "–"
    text = fmt(entry["value"], entry["ci_low"], entry["ci_high"], signed)
    return f"{text} (n={entry['n']})" if with_n else text


def summary_lines(report: dict) -> list[str]:
    names = [m["name"] for m in report["models"]]
    rows = []
    for judge in report["judges"]:
        for model in names:
            cells = [_cell(_find(report["metrics"], model=model, judge=judge["name"], metric=m, category=None),
                           signed=m.startswith("mean_margin")) for m in MAIN_METRICS]
            rows.append([f"`{model}`", f"`{judge['name']}`", *cells])
    return ["## Refusal per model", "", *table(["model", "judge", *LABELS.values()], rows), ""]


def drift_lines(report: dict) -> list[str]:
    rows = [[f"`{e['model']}`", f"`{e['judge']}`", LABELS.get(e["metric"], e["metric"]), _cell(e, signed=True)]
            for e in report["drift"] if e["category"] is None]
    if not rows:
        return []
    head = f"## Drift from `{report['reference']}` (fine-tuned − reference)"
    return [head, "", *table(["model", "judge", "metric", "drift [95 % CI]"], rows), ""]


def reduction_lines(report: dict) -> list[str]:
    entries = report["drift_reduction"]
    if not entries:
        return []
    agl, plain = entries[0]["agl"], entries[0]["plain"]
    rows = []
    for e in entries:
        value = _cell(e, with_n=False) if e["value"] is not None else "undefined (plain drift = 0)"
        partly = e["undefined_resamples"] and e["value"] is not None
        note = f" ({e['undefined_resamples']} resamples undefined)" if partly else ""
        rows.append([f"`{e['judge']}`", LABELS.get(e["metric"], e["metric"]), fmt(e["drift_agl"], signed=True),
                     fmt(e["drift_plain"], signed=True), value + note])
    return [f"## Drift reduction: `{agl}` vs `{plain}`", "",
            f"drift reduction = 1 − drift(`{agl}`) / drift(`{plain}`), both from `{report['reference']}`; "
            "1 = AGL kept all of it, 0 = no better than plain LoRA.", "",
            *table(["judge", "metric", f"drift `{agl}`", f"drift `{plain}`", "reduction [95 % CI]"], rows), ""]


def category_lines(report: dict, judge: str) -> list[str]:
    names = [m["name"] for m in report["models"]]
    keys = sorted({(e["metric"], e["category"]) for e in report["metrics"]
                   if e["judge"] == judge and e["category"] is not None
                   and e["metric"] in ("refusal_rate", "over_refusal_rate")},
                  key=lambda k: (k[0] != "refusal_rate", k[1]))  # unsafe categories first
    rows = []
    for metric, cat in keys:
        cells = [_cell(_find(report["metrics"], model=m, judge=judge, metric=metric, category=cat), with_n=False)
                 for m in names]
        n = _find(report["metrics"], judge=judge, metric=metric, category=cat)["n"]
        rows.append([LABELS[metric], cat, str(n), *cells])
    if not rows:
        return []
    headers = ["metric", "category", "n", *[f"`{m}`" for m in names]]
    return [f"## Per category (judge `{judge}`)", "", *table(headers, rows), ""]


def header_lines(report: dict) -> list[str]:
    s, p, b = report["settings"], report["prompts"], report["bootstrap"]
    adapters = ", ".join(f"`{m['name']}` ({m['adapter']})" for m in report["models"] if m["adapter"]) or "none"
    lines = ["# DriftCheck report", "",
             f"- Base model: `{s['model']}`; adapters: {adapters}; reference: `{report['reference']}`.",
             f"- Prompts: {p['n']} ({p['unsafe']} unsafe, {p['safe']} safe) from {', '.join(s['prompts']['sources'])}.",
             f"- Intervals: {round(100 * b['confidence'])} % percentile bootstrap over prompts ({b['resamples']} "
             f"resamples, seed {b['seed']}), paired across models.",
             f"- Generated by {report['generated_by']} at {report['created_at']}.", ""]
    for w in report["warnings"]:
        lines.append(f"> **Warning:** {w}")
    return lines + ([""] if report["warnings"] else [])


def judges_lines(report: dict) -> list[str]:
    lines = ["## Judges", ""]
    for j in report["judges"]:
        lines.append(f"- `{j['name']}` ({j['kind']} judge, {j['n_prompts']} prompts): {j['description']}")
    return lines + [""]


def render_markdown(report: dict) -> str:
    """The whole Markdown document for `report` (a dict from build_report)."""
    lines = header_lines(report) + summary_lines(report) + drift_lines(report) + reduction_lines(report)
    for judge in report["judges"]:
        lines += category_lines(report, judge["name"])
    lines += judges_lines(report)
    plots = report["files"]["plots"]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)
