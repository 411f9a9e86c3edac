"""`run_drift`: evaluate a base model and its adapters with the judges, resumably, then write the reports."""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from .generation import check_chat_template, greedy_responses
from .judges import DEFAULT_JUDGES, Judge, MarginJudge, checked_scores, select_judges
from .loading import BASE, active, adapter_digest, adapter_shapes, attach_adapters, check_name, read_adapter_config
from .margin import margins_and_responses
from .metrics import check_roles
from .overlap import find_masks, overlap_warning
from .promptsets import DEFAULT_PROMPTS, load_eval_prompts
from .store import ResultStore, reusable_rows

log = logging.getLogger("agl_plugins.drift")


@dataclass
class DriftOptions:
    """Everything one DriftCheck run needs; the CLI fills it from its flags (same names)."""

    model: str
    out: str
    adapters: dict[str, str] = field(default_factory=dict)  # name → PEFT folder
    prompts: Optional[Sequence[Any]] = None  # sources (see load_eval_prompts); None = the shipped eval sets
    judges: Sequence[str] = DEFAULT_JUDGES
    max_prompts: Optional[int] = 240  # a fixed sample, unsafe and safe alternating; None = every prompt
    max_generations: Optional[int] = 64  # how many of them the generation judges (pattern, plugins) see; None = all
    max_new_tokens: int = 48
    batch_size: int = 8
    reference: str = BASE
    compare: Optional[dict[str, str]] = None  # {"agl": name, "plain": name}
    mask: Optional[str] = None
    use_chat_template: bool = True
    device: str = "auto"
    overwrite: bool = False
    resamples: int = 1000
    seed: int = 0
    prompt_column: str = "prompt"
    label_column: str = "label"
    default_label: Optional[str] = None
    progress: bool = True
    plots: bool = True
    threads: Optional[int] = None  # torch CPU threads; 1 avoids oversubscription on a busy shared machine
    reuse: Sequence[str] = ()  # earlier DriftCheck folders whose rows this run would compute identically: not redone
    # (i, n): judge only the i-th of n interleaved parts of the prompt batches (1 ≤ i ≤ n), e.g. to split one run
    # across processes; a run over every prompt then merges the parts' folders with `reuse`. None = every batch.
    part: Optional[tuple[int, int]] = None

    def check(self) -> None:
        for key, lo in (("max_prompts", 1), ("max_generations", 1), ("max_new_tokens", 1), ("batch_size", 1),
                        ("threads", 1)):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < lo):
                raise ValueError(f"{key}={value!r} is invalid: must be an integer ≥ {lo}.")
        if self.part is not None and not (
                isinstance(self.part, (tuple, list)) and len(self.part) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in self.part)
                and 1 <= self.part[0] <= self.part[1]):
            raise ValueError(f"part={self.part!r} is invalid: give (i, n) with 1 ≤ i ≤ n, e.g. (1, 2) for the first "
                             "of two parts.")
        for folder in self.reuse:
            if Path(folder).expanduser().resolve() == Path(self.out).expanduser().resolve():
                raise ValueError(f"--reuse {folder} is the --out folder itself; give another DriftCheck folder.")
        for name, folder in self.adapters.items():
            check_name(name)
            read_adapter_config(name, folder)
            adapter_shapes(name, folder)
        check_roles([BASE, *self.adapters], self.reference, self.compare)


def _prompt_digest(records: list[dict]) -> str:
    digest = hashlib.sha256()
    for r in records:
        digest.update(f"{r['id']}\t{r['label']}\t{r['prompt']}\n".encode("utf-8"))
    return digest.hexdigest()[:16]


def run_settings(opts: DriftOptions, model_dir: str, records: list[dict], judges: list[Judge]) -> dict:
    """What the results depend on: a folder's results are only resumed under the same settings."""
    given = DEFAULT_PROMPTS if opts.prompts is None else opts.prompts
    sources = [str(s) if isinstance(s, (str, Path)) else type(s).__name__ for s in given]
    return {
        "model": opts.model, "model_dir": str(Path(model_dir).resolve()),
        "adapters": {n: {"path": str(Path(f).expanduser().resolve()), "sha256": adapter_digest(f)}
                     for n, f in opts.adapters.items()},
        "prompts": {"sources": sources, "n": len(records), "sha256": _prompt_digest(records)},
        "judges": {j.name: {"kind": j.kind, **j.settings()} for j in judges},
        "max_generations": opts.max_generations, "max_new_tokens": opts.max_new_tokens,
        "chat_template": opts.use_chat_template,
    }


def _rows(model: str, judge: Judge, batch: list[dict], scores: list[float], values: Optional[list[float]],
          responses: Optional[list[str]]) -> list[dict]:
    out = []
    for i, r in enumerate(batch):
        out.append({"model": model, "judge": judge.name, "id": r["id"], "label": r["label"],
                    "category": r["category"], "score": scores[i], "value": None if values is None else values[i],
                    "response": None if responses is None else responses[i]})
    return out


def judge_batch(model: Any, tokenizer: Any, name: str, batch: list[dict], judges: list[Judge], opts: DriftOptions,
                store: Optional[ResultStore] = None) -> list[dict]:
    """Result rows of one prompt batch for the model running as `name` (rows already stored are skipped)."""
    def missing(judge: Judge, rs: list[dict]) -> list[dict]:
        return [r for r in rs if store is None or not store.has(name, judge.name, r["id"])]

    rows: list[dict] = []
    for judge in (j for j in judges if j.kind == "model"):
        todo = missing(judge, batch)
        if todo:
            raw = judge.impl.score_model(model, tokenizer, [r["prompt"] for r in todo], batch_size=opts.batch_size,
                                         use_chat_template=opts.use_chat_template)
            values = checked_scores(judge, raw, len(todo), bounded=False)
            scores = [1.0 if v > judge.threshold() else 0.0 for v in values]
            rows += _rows(name, judge, todo, scores, values, None)
    gen_judges = [j for j in judges if j.kind == "generation"]
    todo = [r for r in batch if any(missing(j, [r]) for j in gen_judges)]
    if todo:
        responses = greedy_responses(model, tokenizer, [r["prompt"] for r in todo], max_new_tokens=opts.max_new_tokens,
                                     batch_size=opts.batch_size, use_chat_template=opts.use_chat_template)
        for judge in gen_judges:
            picked = [i for i, r in enumerate(todo) if missing(judge, [r])]
            raw = judge.impl([todo[i]["prompt"] for i in picked], [responses[i] for i in picked])
            scores = checked_scores(judge, raw, len(picked), bounded=True)
            rows += _rows(name, judge, [todo[i] for i in picked], scores, None, [responses[i] for i in picked])
    return rows


def judge_model(model: Any, tokenizer: Any, records: list[dict], *, name: str = "model",
                judges: Sequence[str] = DEFAULT_JUDGES, pm: Any = None, max_generations: Optional[int] = None,
                max_new_tokens: int = 48, batch_size: int = 8, use_chat_template: bool = True) -> list[dict]:
    """Result rows (as in results.jsonl) for a model already in memory, e.g. inside a training script.

    records: from `load_eval_prompts`; the generation judges see the first `max_generations` (None = all).
    Feed the rows of several models to `compute_tables` for metrics, drift and intervals.
    """
    from ..manager import available_judges, get_plugin_manager

    chosen = select_judges(list(judges), available_judges(pm if pm is not None else get_plugin_manager()))
    check_chat_template(tokenizer, use_chat_template)
    opts = DriftOptions(model=name, out="", max_new_tokens=max_new_tokens, batch_size=batch_size,
                        use_chat_template=use_chat_template)
    n_gen = len(records) if max_generations is None else max_generations
    rows = []
    for start in range(0, len(records), batch_size):
        rows += _chunk_rows(model, tokenizer, name, start, records[start:start + batch_size], n_gen, chosen, opts)
    return rows


def _chunk_rows(model: Any, tokenizer: Any, name: str, start: int, batch: list[dict], n_gen: int,
                judges: list[Judge], opts: DriftOptions, store: Optional[ResultStore] = None) -> list[dict]:
    """Rows of the prompt chunk starting at `start`: model judges on all of it, generation judges on the part
    before `n_gen` (the generation subset is a prefix of the prompt list)."""
    gen_part = batch[: max(0, n_gen - start)]
    fused = _fused_rows(model, tokenizer, name, batch, gen_part, judges, opts, store)
    if fused is not None:
        return fused
    rows = judge_batch(model, tokenizer, name, batch, [j for j in judges if j.kind == "model"], opts, store)
    if gen_part:
        rows += judge_batch(model, tokenizer, name, gen_part, [j for j in judges if j.kind == "generation"], opts,
                            store)
    return rows


def _fused_rows(model: Any, tokenizer: Any, name: str, batch: list[dict], gen_part: list[dict], judges: list[Judge],
                opts: DriftOptions, store: Optional[ResultStore]) -> Optional[list[dict]]:
    """The rows of a fresh batch judged by the built-in margin judge and generation judges, from one pass of the
    prompts (`margins_and_responses`); None when that does not apply (other model judges, a generation subset,
    rows already stored): then each judge runs on its own, with the same results."""
    model_judges = [j for j in judges if j.kind == "model"]
    gen_judges = [j for j in judges if j.kind == "generation"]
    if len(model_judges) != 1 or type(model_judges[0].impl) is not MarginJudge or not gen_judges \
            or len(gen_part) != len(batch):
        return None
    if store is not None and any(store.has(name, j.name, r["id"]) for j in judges for r in batch):
        return None
    margin, prompts = model_judges[0], [r["prompt"] for r in batch]
    values, responses = margins_and_responses(model, tokenizer, prompts, refusal=margin.impl.refusal,
                                              compliance=margin.impl.compliance, max_new_tokens=opts.max_new_tokens,
                                              batch_size=opts.batch_size, use_chat_template=opts.use_chat_template)
    values = checked_scores(margin, values, len(batch), bounded=False)
    rows = _rows(name, margin, batch, [1.0 if v > margin.threshold() else 0.0 for v in values], values, None)
    for judge in gen_judges:
        scores = checked_scores(judge, judge.impl(prompts, responses), len(batch), bounded=True)
        rows += _rows(name, judge, batch, scores, None, responses)
    return rows


def batches_of(records: list[dict], opts: DriftOptions) -> list[tuple[int, list[dict]]]:
    """(start, prompt batch) pairs this run judges: every batch, or those of its part (opts.part)."""
    batches = [(s, records[s:s + opts.batch_size]) for s in range(0, len(records), opts.batch_size)]
    return batches if opts.part is None else batches[opts.part[0] - 1::opts.part[1]]


def evaluate(model: Any, tokenizer: Any, names: Sequence[str], records: list[dict], judges: list[Judge],
             opts: DriftOptions, store: ResultStore) -> None:
    """Judge every prompt (of opts.part) with every model name; each batch's rows are appended (and flushed) at once."""
    from tqdm.auto import tqdm

    n_gen = len(records) if opts.max_generations is None else min(opts.max_generations, len(records))
    batches = batches_of(records, opts)
    bar = tqdm(total=len(names) * sum(len(b) for _, b in batches), desc="DriftCheck", unit="prompt",
               disable=not opts.progress)
    for name in names:
        bar.set_postfix(model=name)
        with active(model, name):
            for start, batch in batches:
                store.append(_chunk_rows(model, tokenizer, name, start, batch, n_gen, judges, opts, store))
                bar.update(len(batch))
    bar.close()


def _pending(store: ResultStore, names: Sequence[str], batches: list[tuple[int, list[dict]]], judges: list[Judge],
             n_gen: int) -> int:
    count = 0
    for name in names:
        for judge in judges:
            for start, batch in batches:
                part = batch if judge.kind == "model" else batch[: max(0, n_gen - start)]
                count += sum(1 for r in part if not store.has(name, judge.name, r["id"]))
    return count


def _load(opts: DriftOptions, log_fn: Callable[[str], None]) -> tuple[Any, Any, list[str]]:
    from ..models import load_model_and_tokenizer, pick_device

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model, tokenizer = load_model_and_tokenizer(opts.model, device=pick_device(opts.device), progress=log_fn)
    check_chat_template(tokenizer, opts.use_chat_template, repr(opts.model))
    with warnings.catch_warnings():  # deprecation chatter of the libraries, not actionable for the user
        warnings.simplefilter("ignore", FutureWarning)
        model, notes = attach_adapters(model, opts.adapters, opts.model)
    return model, tokenizer, notes


def run_drift(opts: Optional[DriftOptions] = None, *, pm: Any = None, log_fn: Callable[[str], None] = log.info,
              **kwargs: Any) -> dict:
    """Run DriftCheck (options as a DriftOptions or keyword arguments) and return the report dict.

    Writes <out>/run.json, results.jsonl, report.json, report.md and the PNG plots. Resumes an interrupted run.
    """
    from ..manager import available_judges, available_prompt_sets, get_plugin_manager
    from ..models import resolve_model_dir
    from .report import build_report, write_reports

    opts = opts or DriftOptions(**kwargs)
    opts.check()
    pm = pm if pm is not None else get_plugin_manager()
    judges, prompt_sets, notes = select_judges(list(opts.judges), available_judges(pm)), available_prompt_sets(pm), []
    records = load_eval_prompts(opts.prompts, prompt_sets=prompt_sets, max_prompts=opts.max_prompts,
                                prompt_column=opts.prompt_column, label_column=opts.label_column,
                                default_label=opts.default_label, notes=notes)
    for mask in find_masks(opts.mask, list(opts.adapters.values())):
        note = overlap_warning(mask, records, prompt_sets)
        notes += [note] if note else []
    model_dir = resolve_model_dir(opts.model, log_fn)
    store = ResultStore(opts.out, run_settings(opts, str(model_dir), records, judges), overwrite=opts.overwrite)
    for folder in opts.reuse:
        rows, line = reusable_rows(folder, store.settings, BASE)
        store.append(rows)
        log_fn(f"DriftCheck: {line}")
    names = [BASE, *opts.adapters]
    n_gen = len(records) if opts.max_generations is None else min(opts.max_generations, len(records))
    part_note = [] if opts.part is None else [
        f"This run judged part {opts.part[0]} of {opts.part[1]} of the prompts only: its report leaves the other "
        "parts out. Run the other parts (each into its own --out), then one run over every prompt with --reuse FOLDER "
        "for each part's folder: it merges their rows without judging them again."]
    for note in part_note:  # expected, not a warning: said once in the log and kept in the report
        log_fn(f"DriftCheck: {note}")
    if _pending(store, names, batches_of(records, opts), judges, n_gen):
        if opts.threads:
            import torch

            torch.set_num_threads(opts.threads)
        model, tokenizer, load_notes = _load(opts, log_fn)
        notes += load_notes
        evaluate(model, tokenizer, names, records, judges, opts, store)
    for note in notes:
        log.warning(note)
    store.write_info({"judges": {j.name: j.description for j in judges}, "warnings": notes + part_note,
                      "part": opts.part})
    report = build_report(store, reference=opts.reference, compare=opts.compare,
                          resamples=opts.resamples, seed=opts.seed)
    write_reports(report, store.out, store.rows(), plots=opts.plots)
    return report
