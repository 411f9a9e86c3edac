"""DriftCheck metrics from result rows: rates and margins per model, judge and category; drift; drift reduction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from .stats import Bootstrap, ratio_reduction, reduction_samples, resampled_means

RATE_METRIC = {"unsafe": "refusal_rate", "safe": "over_refusal_rate"}  # share of prompts the judge calls refusals
MARGIN_METRIC = {"unsafe": "mean_margin_unsafe", "safe": "mean_margin_safe"}  # model judges: mean value
LABEL_ORDER = ("unsafe", "safe")


@dataclass
class JudgeData:
    """One judge's results as matrices over (model, prompt), on the prompts every model was judged on."""

    judge: str
    kind: str
    models: list[str]
    ids: list[str]
    labels: list[str]
    categories: list[str]
    scores: np.ndarray  # (M, n) refusal scores in [0, 1]
    values: Optional[np.ndarray]  # (M, n) model-judge values (e.g. margins), None for generation judges
    missing: int  # prompts judged for some models only (left out)


def judge_data(rows: Sequence[dict], models: Sequence[str], judge: str, kind: str) -> JudgeData:
    """Collect the rows of `judge` into matrices; prompts missing for any model are left out (counted)."""
    by_model: dict[str, dict[str, dict]] = {m: {} for m in models}
    for r in rows:
        if r["judge"] == judge and r["model"] in by_model:
            by_model[r["model"]][r["id"]] = r
    id_sets = [set(v) for v in by_model.values()]
    common = sorted(set.intersection(*id_sets)) if id_sets else []
    union = set.union(*id_sets) if id_sets else set()
    first = by_model[models[0]] if models else {}
    scores = np.array([[by_model[m][i]["score"] for i in common] for m in models], dtype=float).reshape(len(models), -1)
    values = None
    if kind == "model":
        values = np.array([[by_model[m][i]["value"] for i in common] for m in models], dtype=float)
        values = values.reshape(len(models), -1)
    return JudgeData(judge, kind, list(models), common, [first[i]["label"] for i in common],
                     [first[i]["category"] or "(none)" for i in common], scores, values, len(union) - len(common))


def _groups(data: JudgeData) -> list[tuple[str, Optional[str], np.ndarray]]:
    """(label, category or None for all, prompt indices) for every label and label × category present."""
    labels, cats = np.array(data.labels, dtype=object), np.array(data.categories, dtype=object)
    out = []
    for label in LABEL_ORDER:
        in_label = labels == label
        if not in_label.any():
            continue
        out.append((label, None, np.flatnonzero(in_label)))
        for cat in sorted(set(cats[in_label])):
            out.append((label, cat, np.flatnonzero(in_label & (cats == cat))))
    return out


def _entry(boot: Bootstrap, value: float, samples: np.ndarray, **fields: Any) -> dict:
    low, high = boot.interval(samples)
    return dict(fields, value=float(value), ci_low=low, ci_high=high)


class MetricTables:
    """metrics, drift and drift_reduction lists (JSON-able dicts), each entry naming its judge."""

    def __init__(self, boot: Bootstrap, reference: str, compare: Optional[dict[str, str]]) -> None:
        self.boot, self.reference, self.compare = boot, reference, compare
        self.metrics: list[dict] = []
        self.drift: list[dict] = []
        self.drift_reduction: list[dict] = []

    def add_judge(self, data: JudgeData) -> None:
        quantities = [(data.scores, RATE_METRIC)]
        if data.values is not None:
            quantities.append((data.values, MARGIN_METRIC))
        for label, cat, idx in _groups(data):
            draws = self.boot.draws(len(idx), f"{data.judge}|{label}|{cat}")
            for matrix, names in quantities:
                self._add(data, names[label], cat, matrix[:, idx], draws)

    def _add(self, data: JudgeData, metric: str, cat: Optional[str], x: np.ndarray, draws: np.ndarray) -> None:
        point, boot = x.mean(axis=1), resampled_means(x, draws)  # (M,), (M, R)
        common = dict(judge=data.judge, metric=metric, category=cat, n=int(x.shape[1]))
        for m, model in enumerate(data.models):
            self.metrics.append(_entry(self.boot, point[m], boot[m], model=model, **common))
        ref = data.models.index(self.reference)
        for m, model in enumerate(data.models):
            if m != ref:
                self.drift.append(_entry(self.boot, point[m] - point[ref], boot[m] - boot[ref], model=model,
                                         reference=self.reference, **common))
        if self.compare and cat is None:
            self._add_reduction(data, common, point, boot, ref)

    def _add_reduction(self, data: JudgeData, common: dict, point: np.ndarray, boot: np.ndarray, ref: int) -> None:
        a, p = data.models.index(self.compare["agl"]), data.models.index(self.compare["plain"])
        d_agl, d_plain = point[a] - point[ref], point[p] - point[ref]
        samples, undefined = reduction_samples(boot[a] - boot[ref], boot[p] - boot[ref])
        value = ratio_reduction(float(d_agl), float(d_plain))
        low, high = self.boot.interval(samples) if value is not None else (None, None)
        self.drift_reduction.append(dict(common, agl=self.compare["agl"], plain=self.compare["plain"],
                                         reference=self.reference, drift_agl=float(d_agl),
                                         drift_plain=float(d_plain), value=value, ci_low=low, ci_high=high,
                                         undefined_resamples=undefined))


def check_roles(models: Sequence[str], reference: str, compare: Optional[dict[str, str]]) -> None:
    """ValueError when the reference or the compared runs are not among the evaluated models."""
    if reference not in models:
        raise ValueError(f"--reference {reference!r} is not an evaluated model; choose one of {list(models)}.")
    if not compare:
        return
    if set(compare) != {"agl", "plain"}:
        raise ValueError(f"--compare needs exactly agl=NAME and plain=NAME, got {sorted(compare)}.")
    for role, name in compare.items():
        if name not in models:
            raise ValueError(f"--compare {role}={name!r} is not an evaluated model; choose one of {list(models)}.")
        if name == reference:
            raise ValueError(f"--compare {role}={name!r} is the reference model; compare two fine-tuned models.")
    if compare["agl"] == compare["plain"]:
        raise ValueError("--compare agl= and plain= name the same model; name two different runs.")


def compute_tables(rows: Sequence[dict], models: Sequence[str], judges: Sequence[tuple[str, str]], *,
                   reference: str = "base", compare: Optional[dict[str, str]] = None,
                   boot: Optional[Bootstrap] = None) -> tuple[MetricTables, list[JudgeData]]:
    """Every metric with its bootstrap interval, for judges given as (name, kind) pairs."""
    check_roles(models, reference, compare)
    tables = MetricTables(boot or Bootstrap(), reference, compare)
    datas = [judge_data(rows, models, name, kind) for name, kind in judges]
    for data in datas:
        if data.ids:
            tables.add_judge(data)
    return tables, datas
