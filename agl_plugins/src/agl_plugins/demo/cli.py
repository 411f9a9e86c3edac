"""`agl demo`: the main job — on the packaged SmolLM2-135M-Instruct with a trained-in refusal, a benign LoRA
fine-tune with and without AGL, and what each did to the refusal behaviour and to the task."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "The main job: aligned base → Fisher mask → plain LoRA vs LoRA + AGL fine-tunes → DriftCheck table."


def add_arguments(parser: argparse.ArgumentParser, pm: Any) -> None:
    parser.add_argument("--out", default="out/demo", help="Folder for masks, adapters and reports (default: %(default)s).")
    parser.add_argument("--task", choices=("arith", "sure"), default="arith",
                        help="arith: step-by-step arithmetic word problems (realistic task); sure: every answer opens "
                             "\"Sure! Here's\" (stress test) (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of both fine-tunes (default: %(default)s).")
    parser.add_argument("--workers", type=int, default=None, help="Processes running stages side by side (default: 2 "
                        "on a CPU with ≥ 2 cores — the two fine-tunes train at once — and 1 on a GPU).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: 1 with "
                        "several workers, torch's choice with one).")
    parser.add_argument("--max-train", type=int, default=None, help="Use only this many training rows (a quick look).")
    parser.add_argument("--max-eval", type=int, default=None, help="Evaluate on only this many held-out prompts "
                        "(unsafe and safe alternating; default: all 319 unsafe + 153 safe).")
    parser.add_argument("--fisher-examples", type=int, default=None, help="Estimate the mask from only this many "
                        "alignment examples (default: the whole fisher split, 260).")
    parser.add_argument("--overwrite", action="store_true", help="Redo every stage instead of reusing finished ones.")


def run(args: argparse.Namespace, pm: Any) -> int:
    from .run import DemoOptions, run_demo

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads={args.threads} is invalid: must be ≥ 1.")
        import torch

        torch.set_num_threads(args.threads)
    for flag in ("max_train", "max_eval", "fisher_examples", "workers"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')}={value} is invalid: must be ≥ 1.")
    opts = DemoOptions(out=Path(args.out), task=args.task, seed=args.seed, overwrite=args.overwrite,
                       max_train=args.max_train, max_eval=args.max_eval, fisher_examples=args.fisher_examples,
                       workers=args.workers, threads=args.threads)
    summary = run_demo(opts)
    print(summary["table"])
    return 0
