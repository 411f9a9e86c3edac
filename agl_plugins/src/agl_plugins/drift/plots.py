"""DriftCheck PNG plots (matplotlib, Agg backend): refusal rates with intervals, categories, margin distributions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

RATES = (("refusal_rate", "Refusal rate on unsafe prompts"), ("over_refusal_rate", "Over-refusal rate on safe prompts"))
MARGINS = {"mean_margin_unsafe": "unsafe", "mean_margin_safe": "safe"}
SAFE_METRICS = ("over_refusal_rate", "mean_margin_safe")


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _entry(report: dict, **match: Any) -> Optional[dict]:
    return next((e for e in report["metrics"] if all(e.get(k) == v for k, v in match.items())), None)


def _bars(ax: Any, groups: list[str], series: list[tuple[str, list[Optional[dict]]]], horizontal: bool = False) -> None:
    """Grouped bars with percentile-interval error bars; `series` = (legend label, entry per group)."""
    width = 0.8 / max(1, len(series))
    pos = np.arange(len(groups))
    for k, (label, entries) in enumerate(series):
        vals = np.array([e["value"] if e else np.nan for e in entries])
        low = np.array([e["value"] - e["ci_low"] if e and e["ci_low"] is not None else 0 for e in entries])
        high = np.array([e["ci_high"] - e["value"] if e and e["ci_high"] is not None else 0 for e in entries])
        at = pos - 0.4 + width * (k + 0.5)
        if horizontal:
            ax.barh(at, vals, height=width, xerr=[low, high], capsize=2, label=label)
        else:
            ax.bar(at, vals, width=width, yerr=[low, high], capsize=3, label=label)
            for x, v, top in zip(at, vals, vals + high):
                if np.isfinite(v):  # the value above its interval, so the error bar never hides it
                    ax.annotate(f"{v:.2f}", (x, top), textcoords="offset points", xytext=(0, 3), ha="center",
                                fontsize=7)
    (ax.set_yticks if horizontal else ax.set_xticks)(pos)
    (ax.set_yticklabels if horizontal else ax.set_xticklabels)(groups)


def rates_plot(report: dict, out: Path) -> Path:
    plt = pyplot()
    models = [m["name"] for m in report["models"]]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(models) * 2), 4.2), squeeze=False)
    for ax, (metric, title) in zip(axes[0], RATES):
        series = [(f"judge: {j['name']}", [_entry(report, model=m, judge=j["name"], metric=metric, category=None)
                                           for m in models]) for j in report["judges"]]
        _bars(ax, models, series)
        ax.set_ylim(0, 1.3)
        ax.set_yticks(np.linspace(0, 1, 6))
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("rate (95 % bootstrap CI)")
        ax.legend(fontsize=8, loc="upper center", ncol=max(1, len(series)))  # above the bars (rates ≤ 1)
    fig.suptitle("DriftCheck: refusal per model", fontsize=11)
    fig.tight_layout()
    path = out / "refusal_rates.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def category_plot(report: dict, judge: str, kind: str, out: Path) -> Optional[Path]:
    """Bars per category and model: rates for generation judges, mean values (margins) for model judges."""
    plt = pyplot()
    models = [m["name"] for m in report["models"]]
    wanted = MARGINS if kind == "model" else dict(RATES)
    keys = sorted({(e["metric"], e["category"]) for e in report["metrics"] if e["judge"] == judge
                   and e["category"] is not None and e["metric"] in wanted},
                  key=lambda k: (k[0] in SAFE_METRICS, k[1]))  # unsafe categories first
    if not keys:
        return None
    labels = [f"{cat} ({'safe' if metric in SAFE_METRICS else 'unsafe'})" for metric, cat in keys]
    series = [(m, [_entry(report, model=m, judge=judge, metric=metric, category=cat) for metric, cat in keys])
              for m in models]
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.2 * len(keys) * max(1, len(models)) ** 0.5))
    _bars(ax, labels, series, horizontal=True)
    ax.invert_yaxis()
    if kind == "model":
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel("mean refusal margin per category, 95 % CI (> 0 leans to refusal)")
    else:
        ax.set_xlim(0, 1.05)
        ax.set_xlabel("refusal rate (unsafe) / over-refusal rate (safe), 95 % CI")
    ax.set_title(f"Per category, judge: {judge}", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = out / f"categories_{judge}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def margin_plot(report: dict, rows: list[dict], judge: str, out: Path) -> Optional[Path]:
    plt = pyplot()
    models = [m["name"] for m in report["models"]]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.0 * len(models) * 2), 4.2), squeeze=False)
    drawn = False
    for ax, label in zip(axes[0], ("unsafe", "safe")):
        data = [[r["value"] for r in rows if r["judge"] == judge and r["model"] == m and r["label"] == label]
                for m in models]
        if not any(data):
            ax.set_visible(False)
            continue
        drawn = True
        ax.boxplot([d or [np.nan] for d in data], showmeans=True)
        ax.set_xticks(range(1, len(models) + 1))
        ax.set_xticklabels(models)
        ax.axhline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_title(f"{label} prompts", fontsize=10)
        ax.set_ylabel("log p(refusal) − log p(compliance)")
    if not drawn:
        plt.close(fig)
        return None
    fig.suptitle(f"Refusal margin distribution, judge: {judge} (> 0 leans to refusal; ▲ = mean)", fontsize=11)
    fig.tight_layout()
    path = out / f"margins_{judge}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def drift_plots(report: dict, rows: list[dict], out: Any) -> list[Path]:
    """Every DriftCheck plot for `report` into folder `out`; returns the files written."""
    out = Path(out)
    paths = [rates_plot(report, out)]
    for judge in report["judges"]:
        paths.append(category_plot(report, judge["name"], judge["kind"], out))
        if judge["kind"] == "model":
            paths.append(margin_plot(report, rows, judge["name"], out))
    return [p for p in paths if p is not None]
