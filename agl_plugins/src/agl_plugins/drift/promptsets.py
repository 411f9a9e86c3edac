"""Evaluation prompts for DriftCheck: shipped and plugin sets, local files, `datasets` datasets; sampling."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ..prompts import BUILTIN_PREFIX, DATA_DIR, PromptSet, _record, load_records, parse_builtin
from ..refusals import normalise

log = logging.getLogger("agl_plugins.drift")

DATASETS_PREFIX = "datasets:"
DEFAULT_PROMPTS = (f"{BUILTIN_PREFIX}alignment-v1:eval", f"{BUILTIN_PREFIX}overrefusal-v1")
EVAL_SPLIT = "eval"
FIELDS = ("id", "prompt", "label", "category", "source")


@dataclass
class EvalOnlyPromptSet(PromptSet):
    """A prompt set held out for evaluation: it has only an 'eval' split and refuses to feed a Fisher mask."""

    def records(self, split: Optional[str] = None) -> list[dict]:
        if split in (None, "fisher"):
            raise ValueError(
                f"Prompt set {self.name!r} is for evaluation only (DriftCheck) and is never used to estimate "
                f"masks; use it with `agl drift --prompts {BUILTIN_PREFIX}{self.name}`."
            )
        return super().records(split)


def overrefusal_v1() -> EvalOnlyPromptSet:
    return EvalOnlyPromptSet(
        name="overrefusal-v1",
        path=DATA_DIR / "overrefusal-v1.jsonl",
        description="48 benign prompts that sound edgy (over-refusal bait), 8 categories, written for agl_plugins.",
        license="Apache-2.0 (written for agl_plugins); see data/LICENSES.md",
        splits=(EVAL_SPLIT,),
        default_split=EVAL_SPLIT,
    )


def _builtin(spec: str, prompt_sets: dict[str, Any], notes: list[str]) -> list[dict]:
    """A registered set; its 'eval' split unless the spec names one (a 'fisher'/'all' split gets a warning)."""
    name, split = parse_builtin(spec)
    chosen = prompt_sets.get(name)
    if split is None and chosen is not None:
        splits = tuple(getattr(chosen, "splits", ()))
        split = EVAL_SPLIT if EVAL_SPLIT in splits else getattr(chosen, "default_split", None)
    if split in ("fisher", "all"):
        notes.append(f"{spec} includes the 'fisher' split, the prompts masks are estimated from: a model protected "
                     "by such a mask is then evaluated on its own training signal. Prefer the 'eval' split.")
    return load_records(f"{BUILTIN_PREFIX}{name}", prompt_sets, split=split)


def _load_datasets_source(spec: str) -> Any:
    """A `datasets.Dataset` from 'datasets:<folder saved with save_to_disk | dataset name>[:<split>]'."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{spec!r} needs the `datasets` package: pip install datasets.") from None
    target = spec[len(DATASETS_PREFIX):]
    name, split = target, None
    if not Path(target).exists() and ":" in target:
        name, _, split = target.rpartition(":")
    try:
        saved = any((Path(name) / f).is_file() for f in ("state.json", "dataset_dict.json"))
        if Path(name).is_dir() and saved:  # written by save_to_disk
            data = datasets.load_from_disk(name)
        else:
            data = datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ConnectionError)
        raise ValueError(f"Could not load the dataset {name!r} ({type(err).__name__}: {err}). Offline, pass a "
                         "folder written by Dataset.save_to_disk, a local dataset folder, or a local file.") from None
    return _pick_split(data, spec, split)


def _pick_split(data: Any, spec: str, split: Optional[str]) -> Any:
    if not hasattr(data, "column_names") or isinstance(data.column_names, dict):  # a DatasetDict
        names = list(data.keys())
        if split is None and len(names) == 1:
            split = names[0]
        if split not in names:
            raise ValueError(f"{spec!r} has splits {names}; name one with {spec.split(':')[0]}:<path>:<split>.")
        return data[split]
    return data


def _from_rows(rows: Iterable[Any], source: str, columns: Optional[list[str]], prompt_column: str,
               label_column: str, default_label: Optional[str]) -> list[dict]:
    """Validated records from raw rows (dicts), renaming the prompt/label columns; missing columns → ValueError."""
    needed = [prompt_column] + ([] if default_label else [label_column])
    if columns is not None:
        missing = [c for c in needed if c not in columns]
        if missing:
            raise ValueError(f"{source}: missing column(s) {missing} (found {columns}); pass prompt_column=/"
                             "label_column= (--prompt-column/--label-column), or default_label= (--default-label) "
                             "when every prompt has the same label.")
    out = []
    for i, row in enumerate(rows):
        row = dict(row)
        raw = dict(row, prompt=row.get(prompt_column), label=row.get(label_column))
        out.append(_record(raw, f"{source}:{i}", source, default_label))
    return out


def load_source(source: Any, prompt_sets: dict[str, Any], *, prompt_column: str = "prompt",
                label_column: str = "label", default_label: Optional[str] = None,
                notes: Optional[list[str]] = None) -> list[dict]:
    """Records of one source: 'builtin:<set>[:<split>]', a .jsonl/.json/.csv/.parquet file, 'datasets:<…>',
    a `datasets.Dataset`, or a list of dicts with 'prompt' and 'label'."""
    notes = notes if notes is not None else []
    if isinstance(source, str) and source.startswith(BUILTIN_PREFIX):
        records = _builtin(source, prompt_sets, notes)
    elif isinstance(source, str) and source.startswith(DATASETS_PREFIX):
        data = _load_datasets_source(source)
        records = _from_rows(data, source, list(data.column_names), prompt_column, label_column, default_label)
    elif isinstance(source, (str, Path)):
        records = load_records(str(source), prompt_sets, default_label=default_label)
    elif hasattr(source, "column_names"):  # a datasets.Dataset object
        name = str(getattr(getattr(source, "info", None), "dataset_name", None) or "dataset")
        records = _from_rows(source, name, list(source.column_names), prompt_column, label_column, default_label)
    elif isinstance(source, (list, tuple)):
        records = _from_rows(source, "records", None, prompt_column, label_column, default_label)
    else:
        raise ValueError(f"Unsupported prompt source {type(source).__name__}: pass a spec string, a file path, a "
                         "datasets.Dataset or a list of dicts with 'prompt' and 'label'.")
    if not records:
        raise ValueError(f"The prompt source {source if isinstance(source, str) else type(source).__name__!r} "
                         "holds no prompts; give a set with at least one prompt.")
    return [{k: r[k] for k in FIELDS} for r in records]


def merge_sources(groups: Sequence[list[dict]], notes: list[str]) -> list[dict]:
    """One list: a repeated prompt (same normalised text) is kept once; one id with two prompts is an error."""
    seen_ids: dict[str, str] = {}
    seen_text: set[str] = set()
    merged, dropped = [], 0
    for records in groups:
        for r in records:
            text = normalise(r["prompt"])
            if r["id"] in seen_ids and seen_ids[r["id"]] != text:
                raise ValueError(f"Two different prompts share the id {r['id']!r}; give every prompt a unique "
                                 "'id' (ids key the resumable results).")
            if text in seen_text:
                dropped += 1
                continue
            seen_ids[r["id"]] = text
            seen_text.add(text)
            merged.append(r)
    if dropped:
        notes.append(f"{dropped} repeated prompt(s) (same text after normalisation) were evaluated once.")
    return merged


def order_prompts(records: list[dict]) -> list[dict]:
    """A fixed, order-free interleaving: each label's prompts sorted by a hash of their id, labels alternated
    (unsafe first). Any prefix is a deterministic sample with both labels and a mix of categories."""
    def key(r: dict) -> str:
        return hashlib.sha256(r["id"].encode("utf-8")).hexdigest()

    queues = [sorted((r for r in records if r["label"] == label), key=key) for label in ("unsafe", "safe")]
    ordered = []
    for i in range(max((len(q) for q in queues), default=0)):
        ordered += [q[i] for q in queues if i < len(q)]
    return ordered


def load_eval_prompts(sources: Optional[Sequence[Any]] = None, *, prompt_sets: Optional[dict[str, Any]] = None,
                      max_prompts: Optional[int] = None, prompt_column: str = "prompt", label_column: str = "label",
                      default_label: Optional[str] = None, notes: Optional[list[str]] = None) -> list[dict]:
    """The evaluation prompts, ordered by `order_prompts` and cut to `max_prompts`.

    sources: see `load_source` (default: the held-out split of alignment-v1 plus overrefusal-v1). Records are
    {id, prompt, label ('unsafe' | 'safe'), category, source}. `notes` collects warnings for the report.
    """
    if prompt_sets is None:
        from ..manager import available_prompt_sets

        prompt_sets = available_prompt_sets()
    notes = notes if notes is not None else []
    sources = list(DEFAULT_PROMPTS if sources is None else sources)
    if not sources:
        raise ValueError("No prompt sources given; pass at least one (e.g. builtin:alignment-v1:eval).")
    groups = [load_source(s, prompt_sets, prompt_column=prompt_column, label_column=label_column,
                          default_label=default_label, notes=notes) for s in sources]
    ordered = order_prompts(merge_sources(groups, notes))
    if max_prompts is not None:
        if max_prompts < 1:
            raise ValueError(f"max_prompts={max_prompts} is invalid: must be ≥ 1 (or None for all prompts).")
        ordered = ordered[:max_prompts]
    return ordered
