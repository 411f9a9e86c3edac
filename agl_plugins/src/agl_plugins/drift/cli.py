"""`agl drift`: evaluate a base model and its LoRA adapters for alignment drift, with resumable results."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Optional

from ..manager import available_judges
from .judges import DEFAULT_JUDGES
from .loading import BASE, parse_adapters
from .promptsets import DEFAULT_PROMPTS
from .runner import DriftOptions, run_drift

HELP = "Measure alignment drift: refusal of unsafe prompts, over-refusal of safe ones, per model, with intervals."


def _models(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Base model: a local Hugging Face folder, or "
                        "smollm2-135m-instruct (the packaged SmolLM2-135M-Instruct). Evaluated as 'base'.")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER", help="A PEFT LoRA "
                        "adapter folder on that base, evaluated as NAME; repeat for more (one base load serves all).")
    parser.add_argument("--reference", default=BASE, help="The model drift is measured from (default: %(default)s).")
    parser.add_argument("--compare", nargs=2, metavar=("agl=NAME", "plain=NAME"), default=None, help="Report "
                        "drift reduction = 1 − drift(agl)/drift(plain) for two adapters, e.g. "
                        "--compare agl=agl plain=plain.")
    parser.add_argument("--mask", default=None, help="The AGL mask the adapters were trained with: warn if the "
                        "evaluation prompts overlap its estimation prompts (a mask.safetensors inside an adapter "
                        "folder is checked too).")


def _prompts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompts", action="append", default=None, metavar="SOURCE", help="Evaluation prompts; "
                        "repeat to combine: builtin:<set>[:<split>] (the 'eval' split by default), a .jsonl/.json/"
                        ".csv/.parquet file with 'prompt' and 'label' (unsafe|safe) columns (+ optional 'category', "
                        "'id'), or datasets:<folder saved with save_to_disk | dataset name>[:<split>]. Default: "
                        + " + ".join(DEFAULT_PROMPTS) + ".")
    parser.add_argument("--prompt-column", default="prompt",
                        help="datasets sources: the prompt column (default: %(default)s).")
    parser.add_argument("--label-column", default="label",
                        help="datasets sources: the label column (default: %(default)s).")
    parser.add_argument("--default-label", choices=["unsafe", "safe"], default=None,
                        help="Label for sources without a label column (e.g. a file of harmful prompts only).")
    parser.add_argument("--max-prompts", default="240", help="Evaluate at most this many prompts, a fixed sample "
                        "alternating unsafe and safe; 'all' for every prompt (default: %(default)s). The margin "
                        "judge sees all of them.")
    parser.add_argument("--max-generations", default="64", help="How many of those prompts the generation "
                        "judges (pattern, plugin judges) see: greedy generation is the slow part; 'all' for every "
                        "prompt (default: %(default)s).")


def add_arguments(parser: argparse.ArgumentParser, pm: Any) -> None:
    parser.add_argument("--out", required=True, help="Results folder: run.json, results.jsonl (resumable), "
                        "report.json, report.md and PNG plots.")
    _models(parser)
    _prompts(parser)
    parser.add_argument("--judges", nargs="+", default=list(DEFAULT_JUDGES), choices=sorted(available_judges(pm)),
                        help="Judges to run (default: %(default)s); plugins register more.")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="Greedy tokens generated per prompt for "
                        "the generation judges (default: %(default)s).")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="Prompts per forward/generate call (default: %(default)s).")
    parser.add_argument("--no-chat-template", dest="use_chat_template", action="store_false", help="Feed raw prompt "
                        "text instead of a chat turn (for base models without a chat template).")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:<i> (default: %(default)s).")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice); "
                        "--threads 1 is much faster on a machine whose cores other jobs keep busy.")
    parser.add_argument("--resamples", type=int, default=1000, help="Bootstrap resamples (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0, help="Bootstrap seed (default: %(default)s).")
    parser.add_argument("--overwrite", action="store_true",
                        help="Discard results in --out from a run with other settings.")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="Skip the PNG plots.")
    parser.add_argument("--reuse", action="append", default=[], metavar="FOLDER", help="An earlier DriftCheck --out "
                        "folder (repeatable): its rows for the same base weights, prompts, judges and generation "
                        "settings — the base, and adapters with identical files — are copied, not evaluated again.")
    parser.add_argument("--part", default=None, metavar="I/N", help="Judge only part I of N of the prompts (e.g. "
                        "1/2), to split one run across processes or machines; then run over every prompt with "
                        "--reuse for each part's --out folder to merge them.")


def parse_compare(items: Optional[list[str]]) -> Optional[dict[str, str]]:
    """['agl=A', 'plain=P'] → {'agl': 'A', 'plain': 'P'}; ValueError if malformed."""
    if not items:
        return None
    pairs = dict(item.partition("=")[::2] for item in items)
    if set(pairs) != {"agl", "plain"} or not all(pairs.values()):
        raise ValueError(f"--compare {' '.join(items)} is malformed: write --compare agl=NAME plain=NAME "
                         "(NAME = an --adapter name).")
    return pairs


def count_or_all(flag: str, text: str) -> Optional[int]:
    """'all' → None, '12' → 12; ValueError naming the flag otherwise (the range is checked by DriftOptions)."""
    if str(text).strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{flag} {text!r} is invalid: give a positive integer or 'all'.") from None


def parse_part(text: Optional[str]) -> Optional[tuple[int, int]]:
    """'1/2' → (1, 2); ValueError naming the flag if malformed (the range is checked by DriftOptions)."""
    if text is None:
        return None
    i, _, n = str(text).partition("/")
    try:
        return int(i), int(n)
    except ValueError:
        raise ValueError(f"--part {text!r} is malformed: write I/N, e.g. --part 1/2 for the first of two parts.") \
            from None


def options(args: argparse.Namespace) -> DriftOptions:
    return DriftOptions(
        model=args.model, out=args.out, adapters=parse_adapters(args.adapter), prompts=args.prompts,
        judges=args.judges, max_prompts=count_or_all("--max-prompts", args.max_prompts),
        max_generations=count_or_all("--max-generations", args.max_generations),
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, reference=args.reference,
        compare=parse_compare(args.compare), mask=args.mask, use_chat_template=args.use_chat_template,
        device=args.device, overwrite=args.overwrite, resamples=args.resamples, seed=args.seed,
        prompt_column=args.prompt_column, label_column=args.label_column, default_label=args.default_label,
        plots=args.plots, threads=args.threads, reuse=args.reuse,
        part=parse_part(args.part),
    )


def setup_logging() -> None:
    """DriftCheck warnings (prompt overlap, adapter notes) to stderr as 'agl: warning: …'."""
    logger = logging.getLogger("agl_plugins.drift")
    if not any(getattr(h, "_agl_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("agl: warning: %(message)s"))
        handler.setLevel(logging.WARNING)
        handler._agl_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


def summary(report: dict, out: str) -> str:
    """What the command prints: the headline tables of the Markdown report and the files written."""
    from .markdown import drift_lines, header_lines, reduction_lines, summary_lines

    lines = header_lines(report) + summary_lines(report) + drift_lines(report) + reduction_lines(report)
    files = [report["files"]["json"], report["files"]["markdown"], *report["files"]["plots"]]
    lines.append(f"Wrote {', '.join(files)} and {report['files']['results']} in {out}")
    return "\n".join(lines)


def run(args: argparse.Namespace, pm: Any) -> int:
    setup_logging()
    opts = options(args)
    report = run_drift(opts, pm=pm, log_fn=lambda m: print(m, file=sys.stderr, flush=True))
    print(summary(report, opts.out))
    return 0
