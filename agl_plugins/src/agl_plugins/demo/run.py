"""The orchestration of `agl demo`: stages with a progress line each, finished stages reused, one summary."""

from __future__ import annotations

import json
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

from agl_core.config import AGLConfig
from agl_core.safeio import atomic_write_bytes

from ..drift.store import RUN_FILE
from . import align, pipeline
from .pipeline import EVAL_NEW_TOKENS
from .data import arithmetic_task, check_disjoint, eval_records, split_benign, sure_response
from .train import ATTN, FinetuneSpec, mean_nll

# The demo's AGL, chosen by the measurements in docs/results.md (§4c): the setting with the largest drift reduction
# within 2 % of plain LoRA's task loss over three seeds — the diagonal Fisher's top 1 % of coordinates, the alignment
# term without the task regulariser. These are AGLConfig's defaults (a test checks it) and `agl benchmark`'s variant
# coordinate-nt; they are spelled out so that the demo's settings guard sees any change.
MASK = dict(basis="coordinate", rho=0.01)
CONTRASTIVE = False
AGL = dict(lambda_a=1.0, lambda_t=0.0, lambda_nc=0.1)
TASKS = {
    "arith": dict(n_train=300, n_heldout=100, spec=dict(lr=1e-3, epochs=2)),
    "sure": dict(spec=dict(lr=1e-3, epochs=2)),
}


@dataclass
class DemoOptions:
    out: Path = Path("out/demo")
    task: str = "arith"
    seed: int = 0
    overwrite: bool = False
    mask: dict = field(default_factory=lambda: dict(MASK))
    contrastive: bool = CONTRASTIVE
    agl: dict = field(default_factory=lambda: dict(AGL))
    spec: dict = field(default_factory=dict)
    max_train: Optional[int] = None  # cut the task's training rows (smoke tests); None = the full task
    max_eval: Optional[int] = None  # cut the held-out evaluation prompts; None = all (≥ 300 unsafe, ≥ 100 safe)
    fisher_examples: Optional[int] = None  # cut the Fisher data; None = the whole fisher split
    workers: Optional[int] = None  # processes running stages side by side; None = default_workers()
    threads: Optional[int] = None  # torch threads per worker process (None: 1 with workers ≥ 2, else torch's choice)
    log: Callable[[str], None] = print


def task_rows(task: str, model: Any, tokenizer: Any, out: Path) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of the benign fine-tune; no unsafe prompt anywhere."""
    if task == "arith":
        cfg = TASKS["arith"]
        data = arithmetic_task(cfg["n_train"], cfg["n_heldout"])
        return data["train"], data["heldout"]
    cache = out / "sure_rows.json"
    if cache.exists():
        rows, held = json.loads(cache.read_text(encoding="utf-8"))
        return rows, held
    from agl_core.batches import generate_targets

    pools = split_benign()
    prompts = pools["task"] + pools["heldout"]
    ids = generate_targets(model, tokenizer, prompts, max_new_tokens=64, batch_size=16)
    rows = [{"prompt": p, "response": sure_response(tokenizer.decode(t, skip_special_tokens=True))}
            for p, t in zip(prompts, ids)]
    train, held = rows[:len(pools["task"])], rows[len(pools["task"]):]
    atomic_write_bytes(cache, json.dumps([train, held]).encode("utf-8"))
    return train, held


TASK_ROWS_VERSION = 2  # 2: the arith held-out rows are generated first (1: after the training rows)


def settings_of(opts: DemoOptions) -> dict[str, Any]:
    """What the stages' results depend on: a folder's finished stages are reused only under the same settings."""
    data = {k: v for k, v in TASKS[opts.task].items() if k != "spec"}
    return {"task": opts.task, "task_data": {**data, "rows_version": TASK_ROWS_VERSION}, "seed": opts.seed,
            "mask": opts.mask, "contrastive": opts.contrastive, "agl": opts.agl,
            "spec": {**TASKS[opts.task]["spec"], **opts.spec}, "max_train": opts.max_train, "max_eval": opts.max_eval,
            "fisher_examples": opts.fisher_examples, "aligned_base": align.adapter_digest(align.ADAPTER_DIR)}


def check_settings(opts: DemoOptions) -> None:
    """Record the settings in <out>/settings.json; refuse to mix stages of runs with other settings."""
    path = opts.out / "settings.json"
    current = json.loads(json.dumps(settings_of(opts)))
    if path.exists() and not opts.overwrite:
        previous = json.loads(path.read_text(encoding="utf-8"))
        if previous != current:
            changed = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k))
            raise ValueError(f"{opts.out} holds a demo run with other settings ({', '.join(changed)}); "
                             f"pass --overwrite to redo it, or choose another --out.")
    if opts.overwrite:
        import shutil

        for sub in ("mask", "adapters", "drift", "drift-runs"):
            shutil.rmtree(opts.out / sub, ignore_errors=True)
        (opts.out / "sure_rows.json").unlink(missing_ok=True)
    atomic_write_bytes(path, json.dumps(current, indent=1).encode("utf-8"))


def _stage(opts: DemoOptions, i: int, n: int, text: str) -> float:
    opts.log(f"[{i}/{n}] {text}")
    return time.perf_counter()


def _agl_config(opts: DemoOptions, mask_path: Path) -> AGLConfig:
    return AGLConfig(mask_path=str(mask_path), **{**opts.mask, **opts.agl})


def default_workers() -> int:
    """Two worker processes of one thread on a CPU with ≥ 2 cores (two fine-tunes side by side use the cores far
    better than one fine-tune with two threads); one on a GPU or a single core."""
    import os

    import torch

    return 1 if torch.cuda.is_available() else max(1, min(2, os.cpu_count() or 1))


def base_judged_dir(base_dir: Path, max_eval: Optional[int]) -> Path:
    """Where the aligned base's own DriftCheck rows are kept (they depend only on it and on the evaluation)."""
    return base_dir.parent / f"{base_dir.name}-driftcheck-{max_eval or 'all'}-{EVAL_NEW_TOKENS}"


def _drift_options(base_dir: Path, out: Path, adapters: dict[str, str], opts: DemoOptions, **more: Any) -> Any:
    from ..drift.runner import DriftOptions

    return DriftOptions(model=str(base_dir), out=str(out), adapters=adapters, max_prompts=opts.max_eval,
                        max_generations=None, max_new_tokens=EVAL_NEW_TOKENS, batch_size=32, progress=False,
                        overwrite=opts.overwrite, **more)


# ----- the jobs: top-level functions, so that worker processes can run them -----

def _init_worker(threads: int) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()
    warnings.simplefilter("ignore", FutureWarning)  # the libraries' deprecation notes, once per worker: not actionable


def _fisher_job(base_dir: Path, opts: DemoOptions, mask_dir: Path) -> None:
    from ..models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(base_dir), progress=lambda s: None)
    mask_cfg = AGLConfig(**opts.mask)
    kinds = ("contrastive",) if opts.contrastive else (("kfac",) if mask_cfg.basis == "kfac" else ("diagonal",))
    stats = pipeline.estimate_stats(model, tokenizer, ATTN, kinds=kinds, max_examples=opts.fisher_examples,
                                    progress=False, targets_cache=pipeline.targets_cache_dir(base_dir))
    pipeline.build_mask(stats, mask_cfg, model, mask_dir, contrastive=opts.contrastive)


def _base_job(base_dir: Path, opts: DemoOptions) -> None:
    from ..drift.runner import run_drift

    run_drift(_drift_options(base_dir, base_judged_dir(base_dir, opts.max_eval), {}, opts, plots=False),
              log_fn=lambda s: None)


def _finetune_job(base_dir: Path, opts: DemoOptions, name: str, rows: list[dict], held: list[dict],
                  spec: FinetuneSpec) -> dict:
    """Fine-tune and measure the held-out task loss (unless its record exists)."""
    record = opts.out / "adapters" / f"{name}.json"
    if not opts.overwrite and record.exists():
        return json.loads(record.read_text(encoding="utf-8"))
    res = pipeline.finetune(str(base_dir), rows, held, spec, opts.out / "adapters", name, progress=False,
                            step_log=lambda line: opts.log(f"      [{name}] {line}"))
    atomic_write_bytes(record, json.dumps(res.__dict__, indent=1).encode("utf-8"))
    return res.__dict__


def judged_folders(base_dir: Path, opts: DemoOptions, but: Optional[Path] = None) -> list[str]:
    """DriftCheck folders whose rows a demo run may reuse: the base's, and every finished-or-running one of this
    demo's fine-tunes (reusable_rows takes only rows it would compute identically: same adapter file, settings)."""
    runs = sorted(d for d in (opts.out / "drift-runs").glob("*") if (d / RUN_FILE).is_file() and d != but)
    return [str(base_judged_dir(base_dir, opts.max_eval))] + [str(d) for d in runs]


def _judge_job(base_dir: Path, opts: DemoOptions, name: str, adapter: str, part: Optional[tuple[int, int]]) -> None:
    """DriftCheck of one fine-tune on the held-out prompts (or on one part of them), reusing every judged row."""
    from ..drift.runner import run_drift

    folder = opts.out / "drift-runs" / (name if part is None else f"{name}-part{part[0]}of{part[1]}")
    run_drift(_drift_options(base_dir, folder, {name: adapter}, opts, plots=False, part=part,
                             reuse=judged_folders(base_dir, opts, but=folder)), log_fn=lambda s: None)


class _Inline:
    """An executor that runs each job at submit time, in this process (one worker)."""

    def submit(self, fn: Callable, *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as err:  # noqa: BLE001 - handed to the caller through the future, like a pool would
            future.set_exception(err)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run every stage (reusing finished ones unless opts.overwrite) and return the summary (also written).

    With opts.workers ≥ 2 the stages run in worker processes of opts.threads threads each, as soon as what they
    need is there: the Fisher mask and the base's evaluation first, then each fine-tune with its evaluation."""
    from peft import PeftModel  # noqa: F401  (fail early, before any long stage, if peft is missing)

    if opts.task not in TASKS:
        raise ValueError(f"task={opts.task!r} is not a demo task; choose one of {sorted(TASKS)}.")
    workers = opts.workers or default_workers()
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    check_settings(opts)
    start, n = time.perf_counter(), 5
    _stage(opts, 1, n, "aligned base (SmolLM2-135M-Instruct + the shipped refusal adapter, merged; cached)")
    base_dir = align.ensure_aligned_base(progress=opts.log)
    mask_dir = out / "mask"
    need_mask = opts.overwrite or not (mask_dir / "mask.safetensors").exists()
    pool: Any = _Inline()
    if workers > 1:  # started now, so that the workers' start and the Fisher mask overlap the checks below
        import multiprocessing

        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(opts.threads or 1,))
    job_opts = replace(opts, log=print) if workers > 1 else opts  # what a worker process gets (picklable)
    running: dict[Future, tuple[str, float]] = {}
    try:
        check_disjoint([r["prompt"] for r in pipeline.fisher_records()], [r["prompt"] for r in eval_records()],
                       "Fisher")
        if need_mask and workers > 1:
            t = _stage(opts, 2, n, FISHER_STAGE)
            running[pool.submit(_fisher_job, base_dir, job_opts, mask_dir)] = ("fisher", t)
        return _run_stages(opts, base_dir, mask_dir, need_mask, pool, job_opts, running, workers, start, n)
    except BaseException:
        busy = [name for future, (name, _) in running.items() if not future.done()]
        if busy:  # the pool cannot stop a running job: say why the error takes a while to show
            opts.log(f"      stopping: waiting for the running stage(s) {', '.join(busy)} to end first")
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


FISHER_STAGE = "Fisher mask from alignment-v1's fisher split (disjoint from every evaluation prompt)"


def _run_stages(opts: DemoOptions, base_dir: Path, mask_dir: Path, need_mask: bool, pool: Any, job_opts: DemoOptions,
                running: dict[Future, tuple[str, float]], workers: int, start: float, n: int) -> dict[str, Any]:
    """The demo after its first checks: the rest of the stages on `pool` (the Fisher mask may be running already),
    then the report."""
    from ..drift.runner import run_drift
    from ..models import load_model_and_tokenizer

    out = opts.out
    model, tokenizer = load_model_and_tokenizer(str(base_dir), progress=lambda s: None)
    rows, held = task_rows(opts.task, model, tokenizer, out)
    rows = rows[:opts.max_train] if opts.max_train else rows
    base_loss = mean_nll(model, tokenizer, held)  # the aligned base on the held-out task rows
    del model
    timings = {"aligned base": time.perf_counter() - start}
    spec_args = {**TASKS[opts.task]["spec"], **opts.spec}
    specs = {"plain": FinetuneSpec(seed=opts.seed, agl=None, **spec_args),
             "agl": FinetuneSpec(seed=opts.seed, agl=_agl_config(opts, mask_dir), **spec_args)}
    what = {"fisher": (2, FISHER_STAGE),
            "plain": (3, f"plain LoRA on '{opts.task}': {len(rows)} examples, {spec_args['epochs']:g} epochs, "
                         f"lr {spec_args['lr']:g}"),
            "agl": (4, "LoRA + AGL (same data, seed, steps)"),
            "judge": (5, "DriftCheck on the held-out prompts: the aligned base (rows kept with the cached base), then "
                         "each fine-tune as soon as it is trained")}
    opts.log(f"      {workers} worker process{'es' if workers > 1 else ''} of {opts.threads or 1} thread(s)"
             if workers > 1 else "      one process")
    results: dict[str, dict] = {}
    # Each fine-tune's DriftCheck is split into two parts per worker, so that the last fine-tune's evaluation uses
    # every core and the workers finish close together; the report merges the parts' rows.
    n_parts = 2 * workers
    parts: list[Optional[tuple[int, int]]] = [(i, n_parts) for i in range(1, n_parts + 1)] if workers > 1 else [None]
    started = {name for name, _ in running.values()}
    # (name, what it needs, the call): in priority order; a free worker takes the first job whose needs are done
    jobs: list[tuple[str, set[str], Callable[[], tuple]]] = [
        *([("fisher", set(), lambda: (_fisher_job, base_dir, job_opts, mask_dir))]
          if need_mask and "fisher" not in started else []),
        ("plain", set(), lambda: (_finetune_job, base_dir, job_opts, "plain", rows, held, specs["plain"])),
        ("agl", {"fisher"}, lambda: (_finetune_job, base_dir, job_opts, "agl", rows, held, specs["agl"])),
        ("base", set(), lambda: (_base_job, base_dir, job_opts)),
        *[(f"{name} judged{'' if part is None else f' {part[0]}/{part[1]}'}", {name, "base"},
           lambda name=name, part=part: (_judge_job, base_dir, job_opts, name, results[name]["adapter"], part))
          for name in ("agl", "plain") for part in parts]]
    done: set[str] = set() if need_mask else {"fisher"}
    if not need_mask or "fisher" in started:
        what.pop("fisher")
    if not need_mask:
        _stage(opts, 2, n, f"Fisher mask: reused ({mask_dir})")
    while jobs or running:
        for job in [j for j in jobs if j[1] <= done]:
            if len(running) >= workers:
                break
            jobs.remove(job)
            name, _, call = job
            stage = what.pop(name if name in ("fisher", "plain", "agl") else "judge", None)
            t = _stage(opts, stage[0], n, stage[1]) if stage else time.perf_counter()
            fn, *args = call()
            running[pool.submit(fn, *args)] = (name, t)
        if not running:
            raise RuntimeError(f"demo stages {[j[0] for j in jobs]} wait for stages that never ran")  # a bug
        finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
        for future in finished:
            name, t = running.pop(future)
            value = future.result()  # a job's error stops the demo here, with its own message
            minutes = (time.perf_counter() - t) / 60
            timings[{"fisher": "fisher mask", "base": "base judged"}.get(name, name)] = time.perf_counter() - t
            done.add(name)
            if name in ("plain", "agl"):
                results[name] = value
                opts.log(f"      {name}: held-out task loss {value['task_loss']:.4f} ({minutes:.1f} min)")
            else:
                opts.log(f"      {name}: done ({minutes:.1f} min)")

    t = time.perf_counter()
    report = run_drift(_drift_options(base_dir, out / "drift", {k: v["adapter"] for k, v in results.items()}, opts,
                                      compare={"agl": "agl", "plain": "plain"}, mask=str(mask_dir),
                                      reuse=judged_folders(base_dir, opts)),
                       log_fn=lambda s: None)
    timings["report"] = time.perf_counter() - t
    summary = summarise(report, results, base_loss, opts, timings, time.perf_counter() - start)
    atomic_write_bytes(out / "demo.json", json.dumps(summary, indent=1).encode("utf-8"))
    atomic_write_bytes(out / "demo.md", (summary["table"] + "\n").encode("utf-8"))
    return summary


def _metric(report: dict, model: str, metric: str, judge: str = "pattern") -> Optional[dict]:
    return next((e for e in report["metrics"] if e["model"] == model and e["metric"] == metric
                 and e["judge"] == judge and e["category"] is None), None)


def _pct(entry: Optional[dict]) -> str:
    if entry is None:
        return "–"
    return f"{100 * entry['value']:.1f} [{100 * entry['ci_low']:.1f}, {100 * entry['ci_high']:.1f}]"


def summarise(report: dict, results: dict, base_loss: float, opts: DemoOptions, timings: dict,
              total: float) -> dict[str, Any]:
    """The one table `agl demo` prints (and writes as demo.md / demo.json)."""
    red = next((e for e in report["drift_reduction"] if e["judge"] == "pattern" and e["metric"] == "refusal_rate"), None)
    red_margin = next((e for e in report["drift_reduction"] if e["judge"] == "margin"
                       and e["metric"] == "mean_margin_unsafe"), None)
    losses = {"base": base_loss, "plain": results["plain"]["task_loss"], "agl": results["agl"]["task_loss"]}
    rows = []
    for name, label in (("base", "aligned base"), ("plain", "plain LoRA"), ("agl", "LoRA + AGL")):
        refusal, over = _metric(report, name, "refusal_rate"), _metric(report, name, "over_refusal_rate")
        margin = _metric(report, name, "mean_margin_unsafe", judge="margin")
        cost = "" if name == "base" else f" ({100 * (losses[name] / losses['plain'] - 1):+.1f} % vs plain)"
        rows.append(f"| {label} | {_pct(refusal)} | {_pct(over)} | "
                    f"{'–' if margin is None else format(margin['value'], '+.2f')} | {losses[name]:.4f}{cost} |")

    def reduction(e: Optional[dict]) -> str:
        if e is None or e["value"] is None:
            return "undefined (plain LoRA did not drift)"
        return f"{100 * e['value']:.1f} % [{100 * e['ci_low']:.1f}, {100 * e['ci_high']:.1f}]"

    n_unsafe = next((e["n"] for e in report["metrics"] if e["metric"] == "refusal_rate" and e["category"] is None), 0)
    n_safe = next((e["n"] for e in report["metrics"] if e["metric"] == "over_refusal_rate" and e["category"] is None), 0)
    lines = [
        f"AGL demo — task '{opts.task}', seed {opts.seed}: {n_unsafe} held-out unsafe and {n_safe} held-out safe "
        f"prompts (pattern judge, greedy, {EVAL_NEW_TOKENS} new tokens; 95 % bootstrap intervals)",
        "",
        "| model | refusal % (unsafe) | over-refusal % (safe) | refusal margin (unsafe) | held-out task loss |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"Drift reduction (refusal rate): {reduction(red)}; (refusal margin): {reduction(red_margin)}",
        f"AGL: {', '.join(f'{k}={v}' for k, v in {**opts.mask, **opts.agl}.items())}, contrastive={opts.contrastive}",
        f"Reports: {opts.out / 'drift' / 'report.md'} (+ report.json, PNG plots); total {total / 60:.1f} min",
    ]
    return {"task": opts.task, "seed": opts.seed, "task_loss": losses, "drift_reduction": red,
            "drift_reduction_margin": red_margin, "results": results, "timings_s": timings, "total_s": total,
            "mask": opts.mask, "agl": opts.agl, "contrastive": opts.contrastive, "table": "\n".join(lines)}
