"""The forgetting plot: alignment loss per method against D (log x) and its excess L − L0 on log-log axes, with fits."""

from __future__ import annotations

import numpy as np

from ..drift.plots import pyplot


def _fit_line(fit: dict, D: np.ndarray) -> np.ndarray:
    grid = np.geomspace(D[1], D[-1], 200)
    return grid, fit["A"] * grid ** fit["beta"] + fit["E"]


def forgetting_plot(report: dict, path: str) -> None:
    """Two panels into `path` (PNG): L(D) with its bootstrap band and the fitted law; L − L0 log-log."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    hidden = 0
    for k, m in enumerate(report["methods"]):
        color = colors[k % len(colors)]
        D, L, fit = np.asarray(m["D"]), np.asarray(m["curve"]), m["fit"]
        band = np.asarray([[np.nan if v is None else v for v in ci] for ci in m["curve_ci"]])
        grid, excess = _fit_line(fit, D)
        name = f"{m['label']} (β={fit['beta']:.2f}, A={fit['A']:.3g}{', E=%.3g' % fit['E'] if fit['residual'] else ''})"
        for seed in m["seeds"] if len(m["seeds"]) > 1 else []:
            left.plot(D[1:], np.asarray(seed["curve"])[1:], color=color, alpha=0.25, linewidth=0.8)
        left.fill_between(D[1:], band[1:, 0], band[1:, 1], color=color, alpha=0.15)
        left.plot(D[1:], L[1:], "o", color=color, markersize=4)
        left.plot(grid, fit["L0"] + excess, "-", color=color, label=name)
        left.axhline(fit["L0"], color=color, linestyle=":", linewidth=0.8)
        y = L[1:] - fit["L0"]
        keep = y > 0  # log axes show positive excess only
        hidden += int((~keep).sum())
        right.plot(D[1:][keep], y[keep], "o", color=color, markersize=4)
        pos = excess > 0
        right.plot(grid[pos], excess[pos], "-", color=color, label=m["label"])
        extra = m.get("extrapolation")
        if extra:
            right.axvline(D[extra["fit_points"]], color=color, linestyle="--", linewidth=0.7)
    x = "tokens seen" if report["x"] == "tokens" else "training steps"
    left.set_xscale("log")
    left.set_xlabel(f"D ({x})")
    left.set_ylabel("alignment loss L (nats; dotted: L0 at step 0)")
    left.set_title("Alignment loss, 95 % band over prompts", fontsize=10)
    left.legend(fontsize=7, loc="best")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel(f"D ({x})")
    right.set_ylabel("L − L0 (nats)")
    title = "Excess loss, log-log" + (f" ({hidden} point(s) ≤ 0 not shown)" if hidden else "")
    right.set_title(title + ("; dashed: end of the half used to extrapolate" if any(
        m.get("extrapolation") for m in report["methods"]) else ""), fontsize=9)
    right.legend(fontsize=8, loc="best")
    fig.suptitle(f"Forgetting scaling law {report['law']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
