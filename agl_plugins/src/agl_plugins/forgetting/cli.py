"""`agl forgetting`: fit the forgetting law to the probe rows of training runs and report it per method."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .analysis import FitOptions
from .fit import RESIDUAL_MODES
from .runs import LOSSES, X_AXES

HELP = ("Fit the forgetting law L(D) = L0 + A·D^β (+ E) to the alignment loss measured during training runs "
        "(AGLConfig.forgetting_data), with bootstrap intervals over prompts; report and plot per method.")


def add_arguments(parser: argparse.ArgumentParser, pm: Any) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN_DIR_OR_JSONL", help="A training output_dir holding "
                        "agl_forgetting.jsonl, or the file; labelled by its folder name. NAME=PATH labels it NAME.")
    parser.add_argument("--label", action="append", default=[], metavar="NAME=PATH", help="A run under method NAME; "
                        "repeat with the same NAME for seeds (their mean curve is fitted, each seed too).")
    parser.add_argument("--out", required=True, help="Folder for report.json, report.md and forgetting.png.")
    parser.add_argument("--baseline", default=None, help="The method the others are compared with "
                        "(default: the first label).")
    parser.add_argument("--loss", choices=LOSSES, default="mean", help="Which alignment loss to fit: the mean of "
                        "the unsafe and safe groups, or one group (default: %(default)s).")
    parser.add_argument("--x", choices=X_AXES, default="steps", help="D: optimizer steps, or tokens seen (needs "
                        "include_num_input_tokens_seen=True in training) (default: %(default)s).")
    parser.add_argument("--residual", choices=RESIDUAL_MODES, default="auto", help="The constant E: 'auto' keeps it "
                        "when it lowers AICc, 'on' always fits it, 'off' never (default: %(default)s).")
    parser.add_argument("--extrapolate", action="store_true", help="Also fit on the first half of the points and "
                        "report the prediction error on the second half.")
    parser.add_argument("--resamples", type=int, default=1000, help="Bootstrap resamples (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0, help="Bootstrap seed (default: %(default)s).")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="Skip forgetting.png.")


def run(args: argparse.Namespace, pm: Any) -> int:
    from .report import law_lines, build_report, comparison_lines, extrapolation_lines, write_report

    bad = [s for s in args.label if "=" not in s or not s.partition("=")[0] or not s.partition("=")[2]]
    if bad:
        raise ValueError(f"--label {bad[0]!r} is malformed: write --label NAME=PATH (PATH = a run folder or its "
                         "agl_forgetting.jsonl).")
    opts = FitOptions(loss=args.loss, x=args.x, residual=args.residual, resamples=args.resamples, seed=args.seed,
                      extrapolate=args.extrapolate)
    print(f"agl forgetting: fitting {len(args.runs) + len(args.label)} run(s), {args.resamples} bootstrap resamples",
          file=sys.stderr, flush=True)
    report = build_report([*args.runs, *args.label], opts, args.baseline)
    files = write_report(report, args.out, plots=args.plots)
    lines = law_lines(report) + comparison_lines(report) + extrapolation_lines(report)
    lines.append(f"Wrote {', '.join(p.name for p in files)} in {args.out}")
    print("\n".join(lines))
    return 0
