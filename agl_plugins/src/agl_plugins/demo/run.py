"""The orchestration of `agl demo`: stages with a progress line each, finished stages reused, one summary."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from agl_core.config import AGLConfig
from agl_core.safeio import atomic_write_bytes

from . import align, pipeline
from .pipeline import EVAL_NEW_TOKENS
from .data import arithmetic_task, check_disjoint, eval_records, split_benign, sure_response
from .train import ATTN, FinetuneSpec, mean_nll

# The project's defaults for the demo, chosen by the measurements in docs/results.md.
MASK = dict(basis="kfac", k_out="all", k_in=4, kfac_out_weight="g_diag")
CONTRASTIVE = True
AGL = dict(lambda_a=1.0, lambda_t=0.01, lambda_nc=0.1)
TASKS = {
    "arith": dict(n_train=400, n_heldout=100, spec=dict(lr=1e-3, epochs=2)),
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


def settings_of(opts: DemoOptions) -> dict[str, Any]:
    """What the stages' results depend on: a folder's finished stages are reused only under the same settings."""
    return {"task": opts.task, "seed": opts.seed, "mask": opts.mask, "contrastive": opts.contrastive, "agl": opts.agl,
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

        for sub in ("mask", "adapters", "drift"):
            shutil.rmtree(opts.out / sub, ignore_errors=True)
        (opts.out / "sure_rows.json").unlink(missing_ok=True)
    atomic_write_bytes(path, json.dumps(current, indent=1).encode("utf-8"))


def _stage(opts: DemoOptions, i: int, n: int, text: str) -> float:
    opts.log(f"[{i}/{n}] {text}")
    return time.perf_counter()


def _agl_config(opts: DemoOptions, mask_path: Path) -> AGLConfig:
    return AGLConfig(mask_path=str(mask_path), **{**opts.mask, **opts.agl})


def run_demo(opts: DemoOptions) -> dict[str, Any]:
    """Run every stage (reusing finished ones unless opts.overwrite) and return the summary (also written)."""
    from peft import PeftModel  # noqa: F401  (fail early, before any long stage, if peft is missing)

    from ..drift.runner import DriftOptions, run_drift
    from ..models import load_model_and_tokenizer

    if opts.task not in TASKS:
        raise ValueError(f"task={opts.task!r} is not a demo task; choose one of {sorted(TASKS)}.")
    out = opts.out
    out.mkdir(parents=True, exist_ok=True)
    check_settings(opts)
    start, n = time.perf_counter(), 5
    t = _stage(opts, 1, n, "aligned base (SmolLM2-135M-Instruct + the shipped refusal adapter, merged; cached)")
    base_dir = align.ensure_aligned_base(progress=opts.log)
    model, tokenizer = load_model_and_tokenizer(str(base_dir), progress=lambda s: None)
    timings = {"aligned base": time.perf_counter() - t}

    t = _stage(opts, 2, n, "Fisher statistics on alignment-v1's fisher split (disjoint from every evaluation prompt)")
    mask_cfg = AGLConfig(**opts.mask)
    mask_dir = out / "mask"
    if opts.overwrite or not (mask_dir / "mask.safetensors").exists():
        check_disjoint([r["prompt"] for r in pipeline.fisher_records()], [r["prompt"] for r in eval_records()],
                       "Fisher")
        kinds = ("contrastive",) if opts.contrastive else (("kfac",) if mask_cfg.basis == "kfac" else ("diagonal",))
        stats = pipeline.estimate_stats(model, tokenizer, ATTN, kinds=kinds, max_examples=opts.fisher_examples)
        pipeline.build_mask(stats, mask_cfg, model, mask_dir, contrastive=opts.contrastive)
        del stats
    timings["fisher mask"] = time.perf_counter() - t

    rows, held = task_rows(opts.task, model, tokenizer, out)
    rows = rows[:opts.max_train] if opts.max_train else rows
    base_loss = mean_nll(model, tokenizer, held)  # the aligned base on the held-out task rows
    del model
    spec_args = {**TASKS[opts.task]["spec"], **opts.spec}
    results = {}
    for i, (name, agl) in enumerate((("plain", None), ("agl", _agl_config(opts, mask_dir))), start=3):
        what = "plain LoRA" if agl is None else "LoRA + AGL (same data, seed, steps)"
        t = _stage(opts, i, n, f"{what} on the '{opts.task}' task: {len(rows)} examples, "
                                f"{spec_args['epochs']:g} epochs, lr {spec_args['lr']:g}")
        record = out / "adapters" / f"{name}.json"
        if not opts.overwrite and record.exists():
            results[name] = json.loads(record.read_text(encoding="utf-8"))
        else:
            spec = FinetuneSpec(seed=opts.seed, agl=agl, **spec_args)
            res = pipeline.finetune(str(base_dir), rows, held, spec, out / "adapters", name, progress=True)
            results[name] = res.__dict__
            atomic_write_bytes(record, json.dumps(res.__dict__, indent=1).encode("utf-8"))
        timings[name] = time.perf_counter() - t
        opts.log(f"      held-out task loss {results[name]['task_loss']:.4f}")

    t = _stage(opts, 5, n, "DriftCheck: refusal and over-refusal on held-out prompts (base, plain, agl)")
    report = run_drift(DriftOptions(
        model=str(base_dir), out=str(out / "drift"), adapters={k: v["adapter"] for k, v in results.items()},
        max_prompts=opts.max_eval, max_generations=None, max_new_tokens=EVAL_NEW_TOKENS, batch_size=32,
        compare={"agl": "agl", "plain": "plain"}, mask=str(mask_dir), overwrite=opts.overwrite), log_fn=opts.log)
    timings["driftcheck"] = time.perf_counter() - t
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
