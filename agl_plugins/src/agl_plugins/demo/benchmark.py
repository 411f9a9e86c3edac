"""`agl benchmark`: the published version of the main job — tasks x seeds x variants (bases, λ and ρ sweeps,
ablations, post-hoc projection), one JSON line per finished run (resumable), and a Markdown summary."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from agl_core.config import AGLConfig
from agl_core.safeio import append_durably, atomic_write_bytes

HELP = "The main job's full benchmark: several tasks, seeds, AGL variants and ablations (hours on a CPU)."

# name → (mask settings, AGL penalty settings); None = plain LoRA. Masks are built once per name of mask settings.
COORD = dict(basis="coordinate", rho=0.01)
KFAC16 = dict(basis="kfac", k_in=16, k_out="16")
INPUT4 = dict(basis="kfac", k_in=4, k_out="all")
CONTRAST4 = dict(INPUT4, contrastive=True)
BLOCK16 = dict(basis="kfac", k_in=1, k_out="16")  # top 16 output directions on the top input direction (results §2)
FULL = dict(lambda_a=1.0, lambda_t=0.01, lambda_nc=0.1)  # the penalty weights of the demo before the block basis
NO_TREG = dict(FULL, lambda_t=0.0)  # the demo's weights now (run.AGL, AGLConfig's defaults): no task regulariser
VARIANTS: dict[str, Optional[tuple[dict, dict]]] = {
    "plain": None,
    "coordinate": (COORD, FULL),
    "kfac16": (KFAC16, FULL),
    "input4": (INPUT4, FULL),
    "contrastive4": (CONTRAST4, FULL),
    "contrastive8": (dict(CONTRAST4, k_in=8), FULL),
    # ablations of the default basis
    "fisher-only": (CONTRAST4, dict(lambda_a=1.0, lambda_t=0.0, lambda_nc=0.0)),
    "no-collision": (CONTRAST4, dict(FULL, lambda_nc=0.0)),
    "no-task-reg": (CONTRAST4, dict(FULL, lambda_t=0.0)),
    "hard-split": (CONTRAST4, dict(FULL, split="hard")),
    "lambda-0.1": (CONTRAST4, dict(FULL, lambda_a=0.1)),
    "lambda-10": (CONTRAST4, dict(FULL, lambda_a=10.0)),
    "lambda-100": (CONTRAST4, dict(FULL, lambda_a=100.0)),
    "lambda-1e3": (CONTRAST4, dict(FULL, lambda_a=1e3)),
    "lambda-1e4": (CONTRAST4, dict(FULL, lambda_a=1e4)),
    "coordinate-1e3": (COORD, dict(FULL, lambda_a=1e3)),
    "input-only-1e3": (CONTRAST4, dict(FULL, lambda_a=1e3, lambda_t=0.0)),  # no task regulariser: only L_A + collision
    "block16-0.3": (BLOCK16, dict(FULL, lambda_a=0.3, lambda_t=0.0)),
    "block16-1": (BLOCK16, dict(FULL, lambda_a=1.0, lambda_t=0.0)),  # the demo's AGL before coordinate-nt
    "block16-10": (BLOCK16, dict(FULL, lambda_a=10.0, lambda_t=0.0)),
    "block64-10": (dict(BLOCK16, k_out="64"), dict(FULL, lambda_a=10.0, lambda_t=0.0)),
    "block16-0.2": (BLOCK16, dict(NO_TREG, lambda_a=0.2)),
    "block16-100": (BLOCK16, dict(NO_TREG, lambda_a=100.0)),
    "block16-fisher-only": (BLOCK16, dict(lambda_a=1.0, lambda_t=0.0, lambda_nc=0.0)),  # ablations of block16-1
    "block16-hard-split": (BLOCK16, dict(FULL, lambda_a=1.0, lambda_t=0.0, split="hard")),
    "rho-0.1pct": (dict(COORD, rho=0.001), FULL),
    "rho-5pct": (dict(COORD, rho=0.05), FULL),
    # the other bases with the demo's weights (no task regulariser), for a comparison at equal task loss
    "coordinate-nt": (COORD, NO_TREG),  # the demo's AGL (run.MASK, run.AGL) = AGLConfig's defaults
    "coordinate-nt-10": (COORD, dict(NO_TREG, lambda_a=10.0)),
    "coordinate-nt-100": (COORD, dict(NO_TREG, lambda_a=100.0)),
    "coordinate-nt-1e3": (COORD, dict(NO_TREG, lambda_a=1e3)),
    "coordinate-nt-fisher-only": (COORD, dict(NO_TREG, lambda_nc=0.0)),  # ablations of the demo's AGL
    "coordinate-nt-hard-split": (COORD, dict(NO_TREG, split="hard")),
    # the penalty on the k_proj and o_proj adapters only (the projections whose removal cost least, results §2)
    "coordinate-nt-ko": (COORD, dict(NO_TREG, target_modules=["k_proj", "o_proj"])),
    "kfac16-nt": (KFAC16, NO_TREG),
    "kfac16-nt-1e3": (KFAC16, dict(NO_TREG, lambda_a=1e3)),
    "input4-nt": (INPUT4, NO_TREG),
    "input4-nt-100": (INPUT4, dict(NO_TREG, lambda_a=100.0)),  # the input side (not contrastive) on the stress test
    "input4-nt-1e3": (INPUT4, dict(NO_TREG, lambda_a=1e3)),
    "rho-0.1pct-nt": (dict(COORD, rho=0.001), NO_TREG),
    "rho-2pct-nt": (dict(COORD, rho=0.02), NO_TREG),
    "rho-5pct-nt": (dict(COORD, rho=0.05), NO_TREG),
    # no AGL training: the same seed's plain adapter projected off contrastive4's protected input directions
    "projected": (CONTRAST4, None),
    # plain LoRA trained less (lower lr), for a comparison with AGL at equal task loss
    "plain-lr3e-4": None,
}
SPEC = {"plain-lr3e-4": dict(lr=3e-4)}  # a variant's changes to the task's fine-tune settings
DEFAULT_VARIANTS = tuple(VARIANTS)


def add_arguments(parser: argparse.ArgumentParser, pm: Any) -> None:
    parser.add_argument("--out", default="out/benchmark", help="Results folder (resumable) (default: %(default)s).")
    parser.add_argument("--tasks", nargs="+", default=["arith", "sure"], choices=("arith", "sure"))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="NAME",
                        help=f"Variants to run (default: all): {', '.join(VARIANTS)}.")
    parser.add_argument("--lambda-a", type=float, default=None, help="Override λ_A of every AGL variant.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine).")
    parser.add_argument("--max-eval", type=int, default=None, help="Evaluate on this many held-out prompts (default all).")
    parser.add_argument("--max-train", type=int, default=None,
                        help="Fine-tune on this many task rows (smoke runs; default: the whole task).")
    parser.add_argument("--fisher-examples", type=int, default=None,
                        help="Estimate the masks on this many alignment rows (smoke runs; default: the whole fisher "
                             "split).")
    parser.add_argument("--forgetting", metavar="DATA", default=None,
                        help="Also record every run's forgetting curve on DATA (e.g. builtin:alignment-v1; plain LoRA "
                             "too, with AGL disabled): <out>/adapters/<task>/<seed>/<variant>.trainer/"
                             "agl_forgetting.jsonl, fitted by `agl forgetting`.")
    parser.add_argument("--forgetting-points", type=int, default=None,
                        help="Forgetting probe: measurements per run (default: AGLConfig's).")


def mask_fields(settings: dict) -> dict:
    """A variant's mask settings as AGLConfig fields ('contrastive' is an estimation choice, not a config field)."""
    return {k: v for k, v in settings.items() if k != "contrastive"}


def mask_key(settings: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in sorted(settings.items()))


def paired_reduction(base: np.ndarray, plain: np.ndarray, agl: np.ndarray, resamples: int = 1000,
                     seed: int = 0) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """1 − drift(agl)/drift(plain) of the unsafe refusal rate, with a paired bootstrap 95 % interval over prompts."""
    def red(idx: np.ndarray) -> Optional[float]:
        d_plain = plain[idx].mean() - base[idx].mean()
        return None if abs(d_plain) < 1e-12 else 1.0 - (agl[idx].mean() - base[idx].mean()) / d_plain

    point = red(np.arange(len(base)))
    rng = np.random.default_rng(seed)
    draws = [red(rng.integers(0, len(base), len(base))) for _ in range(resamples)]
    draws = np.array([d for d in draws if d is not None])
    if point is None or not len(draws):
        return point, None, None
    return point, float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))


def run(args: argparse.Namespace, pm: Any) -> int:
    import torch

    from ..models import load_model_and_tokenizer
    from . import align, pipeline
    from .data import eval_records
    from .run import TASK_ROWS_VERSION, TASKS, task_rows
    from .train import ATTN, FinetuneSpec, mean_nll

    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"Unknown variant(s) {unknown}; choose from {list(VARIANTS)}.")
    for flag in ("threads", "max_eval", "max_train", "fisher_examples", "forgetting_points"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={value} is invalid: must be ≥ 1.")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    check_sizes(out, {"max_train": args.max_train, "max_eval": args.max_eval, "fisher_examples": args.fisher_examples,
                      "task_rows_version": TASK_ROWS_VERSION})
    probe = {}
    if args.forgetting:
        probe["forgetting_data"] = args.forgetting
        if args.forgetting_points is not None:
            probe["forgetting_points"] = args.forgetting_points
        AGLConfig(enabled=False, **probe)  # bad probe options fail here, before hours of work
    base_dir = align.ensure_aligned_base()
    model, tok = load_model_and_tokenizer(str(base_dir), progress=lambda s: None)
    records = eval_records()
    if args.max_eval:
        unsafe = [r for r in records if r["label"] == "unsafe"]
        safe = [r for r in records if r["label"] == "safe"]
        records = unsafe[: args.max_eval * 2 // 3] + safe[: args.max_eval // 3]
    masks: dict[str, Path] = {}
    needed = {mask_key(VARIANTS[v][0]): VARIANTS[v][0] for v in args.variants if VARIANTS[v] is not None}
    stats = None
    for key, settings in needed.items():
        path = out / "masks" / key
        if not (path / "mask.safetensors").exists():
            if stats is None:
                print("[benchmark] Fisher statistics (diagonal, K-FAC, reference) on the alignment data", flush=True)
                stats = pipeline.estimate_stats(model, tok, ATTN, kinds=("diagonal", "contrastive"),
                                                max_examples=args.fisher_examples,
                                                targets_cache=pipeline.targets_cache_dir(base_dir))
            pipeline.build_mask(stats, AGLConfig(**mask_fields(settings)), model, path,
                                contrastive=bool(settings.get("contrastive")))
        masks[key] = path
    del stats
    for task in args.tasks:
        rows, held = task_rows(task, model, tok, out)
        rows = rows[:args.max_train] if args.max_train else rows
        bases = [r for r in _read(results_path) if r["variant"] == "base"]
        if task not in {r["task"] for r in bases}:  # the base's answers do not depend on the task: judged once
            rr = next(({"unsafe": r["refusal"], "safe": r["overrefusal"], "scores": r["scores"]} for r in bases
                       if len(r["scores"]) == len(records)), None) or pipeline.refusal_rates(model, tok, records)
            _append(results_path, {"task": task, "seed": None, "variant": "base", "task_loss": mean_nll(model, tok, held),
                                   "refusal": rr["unsafe"], "overrefusal": rr["safe"], "scores": rr["scores"]})
        for seed in args.seeds:
            for variant in args.variants:
                # read before every run: another process on the same folder may have finished this one meanwhile
                done = {(r["task"], r["seed"], r["variant"]) for r in _read(results_path)}
                if (task, seed, variant) in done:
                    continue
                if variant == "projected":
                    _append(results_path, projected_row(out, task, seed, masks[mask_key(VARIANTS[variant][0])],
                                                        str(base_dir), tok, held, records))
                    continue
                agl = AGLConfig(enabled=False, **probe) if probe else None  # plain LoRA: only the probe, if asked
                if VARIANTS[variant] is not None:
                    mset, aset = VARIANTS[variant]
                    aset = dict(aset, lambda_a=args.lambda_a) if args.lambda_a is not None else aset
                    agl = AGLConfig(mask_path=str(masks[mask_key(mset)]), **mask_fields(mset), **aset, **probe)
                spec = FinetuneSpec(seed=seed, agl=agl, **{**TASKS[task]["spec"], **SPEC.get(variant, {})})
                print(f"[benchmark] task={task} seed={seed} variant={variant}", flush=True)
                res = pipeline.finetune(str(base_dir), rows, held, spec, out / "adapters" / task / str(seed), variant,
                                        progress=False)
                rr = pipeline.refusal_rates(pipeline.load_adapter(base_dir, res.adapter), tok, records)
                _append(results_path, {"task": task, "seed": seed, "variant": variant, "task_loss": res.task_loss,
                                       "train_loss": res.train_loss, "refusal": rr["unsafe"], "overrefusal": rr["safe"],
                                       "scores": rr["scores"], "train_s": res.seconds, "agl": res.agl,
                                       "metrics": res.last_metrics, "forgetting": res.forgetting})
    write_summary(out, records)
    print((out / "results.md").read_text(encoding="utf-8"))
    return 0


def projected_row(out: Path, task: str, seed: int, mask: Path, base_dir: str, tok: Any, held: list[dict],
                  records: list[dict]) -> dict:
    """The 'projected' variant: this seed's plain adapter with its update removed on the mask's input directions."""
    from ..project import project_adapter_dir
    from . import pipeline
    from .train import mean_nll

    plain = out / "adapters" / task / str(seed) / "plain"
    if not plain.is_dir():
        raise ValueError(f"Variant 'projected' starts from the plain adapter of seed {seed} ({plain}), which is not "
                         "there: list 'plain' before 'projected' in --variants.")
    t0 = time.perf_counter()
    info = project_adapter_dir(plain, mask, out / "adapters" / task / str(seed) / "projected", overwrite=True)
    tuned = pipeline.load_adapter(base_dir, info["out"])
    task_loss = mean_nll(tuned, tok, held)
    rr = pipeline.refusal_rates(tuned, tok, records)
    return {"task": task, "seed": seed, "variant": "projected", "task_loss": task_loss, "train_loss": None,
            "refusal": rr["unsafe"], "overrefusal": rr["safe"], "scores": rr["scores"],
            "train_s": time.perf_counter() - t0, "agl": None, "metrics": {"projected_modules": info["projected_modules"]},
            "forgetting": None}


def check_sizes(out: Path, sizes: dict) -> None:
    """Record the data sizes of a results folder in <out>/sizes.json; refuse to add runs of other sizes to it (their
    rows would be compared with rows of different data)."""
    path = out / "sizes.json"
    if path.exists():
        previous = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(previous) | set(sizes) if previous.get(k) != sizes.get(k))
        if changed:
            told = ", ".join(f"{k}: {previous.get(k)} there, {sizes.get(k)} now" for k in changed)
            raise ValueError(f"{out} holds benchmark runs of other data sizes ({told}); choose another --out, or "
                             f"repeat the options of the runs in it.")
    elif (out / "results.jsonl").exists() and any(v is not None for k, v in sizes.items() if k != "task_rows_version"):
        raise ValueError(f"{out} holds benchmark runs with no recorded sizes (full-size runs); choose another --out "
                         "for a run with --max-train, --max-eval or --fisher-examples.")
    atomic_write_bytes(path, json.dumps(sizes, indent=1).encode("utf-8"))


def _read(path: Path) -> list[dict]:
    """The finished runs in results.jsonl. Text after the last newline (a row cut by a crash) is not a finished run;
    a whole line that is not a JSON row is skipped with a warning (its run is done again)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    rows, bad = [], []
    for i, line in enumerate(data[:data.rfind(b"\n") + 1].decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and {"task", "seed", "variant"} <= row.keys():
            rows.append(row)
        else:
            bad.append(i)
    if bad:
        print(f"[benchmark] warning: {path} line(s) {', '.join(map(str, bad))} are not result rows: skipped, so those "
              "runs are done again; delete the lines to silence this.", flush=True)
    return rows


def _append(path: Path, row: dict) -> None:
    """One finished run per line, fsynced (an interrupted benchmark resumes after the last line); a row cut by a
    crash is ended first, so that this row gets a line of its own."""
    cut = False
    if path.exists() and path.stat().st_size > 0:
        with path.open("rb") as fh:  # only the last byte tells
            fh.seek(-1, 2)
            cut = fh.read(1) != b"\n"
    append_durably(path, (("\n" if cut else "") + json.dumps(row) + "\n").encode("utf-8"))


def write_summary(out: Path, records: list[dict]) -> None:
    """results.md: per task and variant, refusal / over-refusal / task loss and the paired drift reduction."""
    rows = _read(out / "results.jsonl")
    unsafe = np.array([r["label"] == "unsafe" for r in records])
    lines = ["# AGL benchmark results", "", "Drift reduction = 1 − drift(variant)/drift(plain) of the unsafe refusal "
             "rate (same seed), 95 % paired bootstrap interval over prompts; task-loss cost relative to plain LoRA.", ""]
    for task in sorted({r["task"] for r in rows}):
        base = next((r for r in rows if r["task"] == task and r["variant"] == "base"), None)
        lines += [f"## Task `{task}`", "", "| variant | seed | refusal % | over-refusal % | task loss | cost vs plain "
                  "| drift reduction |", "|---|---|---|---|---|---|---|"]
        if base is not None:
            lines.append(f"| aligned base | – | {100 * base['refusal']:.1f} | {100 * base['overrefusal']:.1f} | "
                         f"{base['task_loss']:.4f} | – | – |")
        for r in sorted((r for r in rows if r["task"] == task and r["variant"] != "base"),
                        key=lambda r: (r["seed"], r["variant"] != "plain", r["variant"])):
            plain = next((p for p in rows if p["task"] == task and p["seed"] == r["seed"] and p["variant"] == "plain"),
                         None)
            cost, reduction = "–", "–"
            if plain is not None and r["variant"] != "plain":
                cost = f"{100 * (r['task_loss'] / plain['task_loss'] - 1):+.1f} %"
                if base is not None and len(base["scores"]) == len(r["scores"]) == len(unsafe):
                    value, lo, hi = paired_reduction(np.array(base["scores"])[unsafe], np.array(plain["scores"])[unsafe],
                                                     np.array(r["scores"])[unsafe])
                    reduction = "undefined" if value is None else (
                        f"{100 * value:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None else f"{100 * value:.1f} %")
            lines.append(f"| {r['variant']} | {r['seed']} | {100 * r['refusal']:.1f} | {100 * r['overrefusal']:.1f} | "
                         f"{r['task_loss']:.4f} | {cost} | {reduction} |")
        lines += [""] + seed_means(rows, task, base, unsafe)
    atomic_write_bytes(out / "results.md", "\n".join(lines).encode("utf-8"))


def seed_means(rows: list[dict], task: str, base: Optional[dict], unsafe: np.ndarray) -> list[str]:
    """Per variant over the seeds that also have plain LoRA: mean rates and task-loss cost, and the drift reduction
    of the prompts of every seed pooled (bootstrap over prompt × seed pairs)."""
    plain = {r["seed"]: r for r in rows if r["task"] == task and r["variant"] == "plain"}
    runs: dict[str, list[dict]] = {}
    for r in rows:
        if r["task"] == task and r["variant"] != "base" and r["seed"] in plain:
            runs.setdefault(r["variant"], []).append(r)
    if not any(len(v) > 1 for v in runs.values()):
        return []
    lines = [f"Mean over seeds (task `{task}`):", "", "| variant | seeds | refusal % | over-refusal % | task loss | "
             "cost vs plain | drift reduction (pooled) |", "|---|---|---|---|---|---|---|"]
    for variant in sorted(runs, key=lambda v: (v != "plain", v)):
        group = runs[variant]
        cost = "–" if variant == "plain" else \
            f"{100 * np.mean([r['task_loss'] / plain[r['seed']]['task_loss'] - 1 for r in group]):+.1f} %"
        reduction = "–"
        ok = base is not None and all(len(r["scores"]) == len(unsafe) == len(plain[r["seed"]]["scores"]) for r in group)
        if variant != "plain" and ok and len(base["scores"]) == len(unsafe):
            b = np.concatenate([np.array(base["scores"])[unsafe] for _ in group])
            p = np.concatenate([np.array(plain[r["seed"]]["scores"])[unsafe] for r in group])
            a = np.concatenate([np.array(r["scores"])[unsafe] for r in group])
            value, lo, hi = paired_reduction(b, p, a)
            reduction = "undefined" if value is None else (
                f"{100 * value:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}]" if lo is not None else f"{100 * value:.1f} %")
        seeds = f"{len(group)} seed{'s' if len(group) > 1 else ''}"
        lines.append(f"| {variant} | {seeds} | {100 * np.mean([r['refusal'] for r in group]):.1f} | "
                     f"{100 * np.mean([r['overrefusal'] for r in group]):.1f} | "
                     f"{np.mean([r['task_loss'] for r in group]):.4f} | {cost} | {reduction} |")
    return lines + [""]
