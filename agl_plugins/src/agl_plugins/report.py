"""Plain-text reports: where a mask's protected coordinates live (per layer, per module type) and timings."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Iterable, Optional


def table(headers: list[str], rows: Iterable[list[str]]) -> str:
    """A left-aligned first column and right-aligned other columns, separated by two spaces."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _group(rows: list[dict], key: str) -> "OrderedDict[Any, dict[str, float]]":
    """Modules, protected and total coordinates summed per value of `key` (layer or module_type)."""
    groups: "OrderedDict[Any, dict[str, float]]" = OrderedDict()
    for row in rows:
        g = groups.setdefault(row[key], {"modules": 0, "protected": 0, "coords": 0.0})
        g["modules"] += 1
        g["protected"] += row["protected"]
        g["coords"] += row["coords"]
    return groups


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.2f} %" if whole else "-"


def _group_table(title: str, label: str, groups: dict, total: int) -> str:
    body = [
        [label_of(k), str(g["modules"]), f"{int(g['protected']):,}", _pct(g["protected"], total),
         _pct(g["protected"], g["coords"])]
        for k, g in groups.items()
    ]
    return f"{title}\n" + table([label, "modules", "protected", "% of S", "% of its coords"], body)


def label_of(key: Any) -> str:
    return "(none)" if key is None else str(key)


def coverage_report(rows: list[dict], coords: dict[str, int]) -> str:
    """Per-layer and per-module-type tables from `FisherMask.summary()` rows.

    coords: name → number of coordinates (out·in) of each covered module, so empty modules count too.
    """
    rows = [dict(r, coords=coords.get(r["name"], 0)) for r in rows]
    total = sum(r["protected"] for r in rows)
    by_layer = _group(sorted(rows, key=lambda r: (r["layer"] is None, r["layer"] or 0)), "layer")
    by_type = _group(sorted(rows, key=lambda r: r["module_type"]), "module_type")
    all_coords = sum(r["coords"] for r in rows)
    head = (f"Protected: |S| = {total:,} of {all_coords:,} coordinates ({_pct(total, all_coords)}) "
            f"in {sum(1 for r in rows if r['protected'])} of {len(rows)} modules")
    return "\n\n".join([
        head,
        _group_table("By layer:", "layer", by_layer, total),
        _group_table("By module type:", "type", by_type, total),
    ])


def timings_report(timings: dict[str, float], total: Optional[float] = None) -> str:
    parts = [f"{name} {seconds:.1f} s" for name, seconds in timings.items()]
    if total is not None:
        parts.append(f"total {total:.1f} s")
    return "Timings: " + " | ".join(parts)
