"""`agl report`: plots of AGL training metrics from a trainer_state.json, and re-rendered DriftCheck reports."""

from __future__ import annotations

import argparse
from typing import Any

from .loading import BASE

HELP = "Plot the agl/* training metrics and loss of a trainer_state.json, or re-render a DriftCheck report."


def add_arguments(parser: argparse.ArgumentParser, pm: Any) -> None:
    parser.add_argument("--trainer-state", default=None, help="A trainer_state.json (or a checkpoint folder "
                        "holding one): writes training.png and training.md into --out.")
    parser.add_argument("--drift", default=None, metavar="FOLDER", help="An `agl drift --out` folder: rebuild its "
                        "report.json, report.md and plots from results.jsonl (no model needed), e.g. with "
                        "another --reference or --compare.")
    parser.add_argument("--out", default=None, help="Output folder (default for --drift: that folder).")
    parser.add_argument("--reference", default=BASE, help="--drift: the reference model (default: %(default)s).")
    parser.add_argument("--compare", nargs=2, metavar=("agl=NAME", "plain=NAME"), default=None,
                        help="--drift: report drift reduction between two adapters.")
    parser.add_argument("--resamples", type=int, default=1000,
                        help="--drift: bootstrap resamples (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0, help="--drift: bootstrap seed (default: %(default)s).")


def _drift(args: argparse.Namespace) -> list[str]:
    from .cli import parse_compare
    from .report import report_from_folder, write_reports
    from .store import ResultStore, load_run

    out = args.out or args.drift
    report = report_from_folder(args.drift, reference=args.reference, compare=parse_compare(args.compare),
                                resamples=args.resamples, seed=args.seed)
    rows = ResultStore(args.drift, load_run(args.drift)["settings"]).rows()
    if out != args.drift:
        from pathlib import Path

        Path(out).mkdir(parents=True, exist_ok=True)
    return [str(p) for p in write_reports(report, out, rows)]


def run(args: argparse.Namespace, pm: Any) -> int:
    if not args.trainer_state and not args.drift:
        raise ValueError("Nothing to report: pass --trainer-state PATH (training metrics) and/or --drift FOLDER "
                         "(a DriftCheck run).")
    written: list[str] = []
    if args.trainer_state:
        if not args.out:
            raise ValueError("--trainer-state needs --out FOLDER for training.png and training.md.")
        from .trainer_report import trainer_report

        written += trainer_report(args.trainer_state, args.out)["files"]
    if args.drift:
        written += _drift(args)
    print("Wrote " + ", ".join(written))
    return 0
