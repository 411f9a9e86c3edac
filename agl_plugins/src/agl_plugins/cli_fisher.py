"""`agl fisher`: estimate the alignment Fisher of a base model on alignment prompts and save the mask."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional

from agl_core.config import ESTIMATORS, MASK_FIELDS, AGLConfig

from .cli_config import add_config_arguments, config_kwargs
from .fisher_run import FisherJob
from .manager import available_estimators, available_prompt_sets
from .prompts import BUILTIN_PREFIX, load_records, parse_builtin, select_examples

HELP = "Estimate an alignment Fisher mask (the weight coordinates where safety behaviour lives) and save it."
FISHER_FIELDS = MASK_FIELDS + ("estimator", "target_modules")  # AGLConfig fields that shape a mask
HELD_OUT_SPLITS = ("eval",)


def add_arguments(parser: argparse.ArgumentParser, pm: Any) -> None:
    parser.add_argument("--model", required=True, help="Local Hugging Face model folder, or smollm2-135m-instruct "
                        "(the packaged SmolLM2-135M-Instruct, converted once into the cache).")
    parser.add_argument("--data", default=f"{BUILTIN_PREFIX}alignment-v1",
                        help=f"Alignment prompts: {BUILTIN_PREFIX}<name>[:<split>] (a registered prompt set; "
                        "its 'fisher' split by default; default: %(default)s) or a .jsonl/.json/.csv file with 'prompt' and 'label' "
                        "(unsafe|safe) plus optional 'response', 'category', 'id'. Records without a response "
                        "get the model's own greedy answer as target.")
    parser.add_argument("--out", required=True, help="Where to save the mask: a folder (→ mask.safetensors "
                        "inside) or a *.safetensors file.")
    parser.add_argument("--max-examples", type=int, default=None, help="Use at most this many examples, taken "
                        "round-robin over labels (default: all); also caps --reference-data.")
    parser.add_argument("--batch-size", type=int, default=8, help="Examples per forward/backward pass (default: %(default)s).")
    parser.add_argument("--max-length", type=int, default=256, help="Tokens per example (prompt + target), cut at the end (default: %(default)s).")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Length of the greedily generated "
                        "targets of records without a response, e.g. the safe prompts (default: %(default)s).")
    parser.add_argument("--reference-data", default=None, help="basis=kfac only: benign prompts (same forms as "
                        "--data; only records labelled 'safe', or without a label, are used) whose input "
                        "covariance makes the contrastive input basis.")
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:<i> (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0, help="torch random seed; the estimation itself is deterministic (default: %(default)s).")
    estimators = sorted(available_estimators(pm))
    add_config_arguments(parser, FISHER_FIELDS, choices={"estimator": estimators})


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_ints(args: argparse.Namespace) -> None:
    for name, lo in (("max_examples", 1), ("batch_size", 1), ("max_length", 2), ("max_new_tokens", 1)):
        value = getattr(args, name)
        if value is not None and value < lo:
            raise ValueError(f"--{name.replace('_', '-')}={value} is invalid: must be an integer ≥ {lo}.")


def mask_config(args: argparse.Namespace, estimators: dict[str, Any]) -> tuple[AGLConfig, str, Any]:
    """(AGLConfig with the mask options given, estimator name, estimator object for estimate_fisher)."""
    kwargs = config_kwargs(args, FISHER_FIELDS)
    name = kwargs.get("estimator", AGLConfig().estimator)
    if name not in estimators:
        raise ValueError(f"Unknown estimator {name!r}; registered estimators: {sorted(estimators)}.")
    if name not in ESTIMATORS:
        kwargs.pop("estimator")  # a plugin estimator: AGLConfig only knows the core names; metadata records it
    config = AGLConfig(**kwargs)
    if config.basis == "kfac" and "estimator" in vars(args):
        raise ValueError("--estimator applies to --basis coordinate; --basis kfac always collects K-FAC statistics.")
    return config, name, estimators[name]


def fisher_records(spec: str, prompt_sets: dict[str, Any], max_examples: Optional[int]) -> list[dict]:
    """The alignment records for the mask; held-out splits are refused (they are for DriftCheck)."""
    if spec.startswith(BUILTIN_PREFIX) and parse_builtin(spec)[1] in HELD_OUT_SPLITS:
        raise ValueError(
            f"{spec!r} selects a held-out split, kept for DriftCheck and never used for masks; "
            f"use {BUILTIN_PREFIX}{parse_builtin(spec)[0]} (its 'fisher' split)."
        )
    return select_examples(load_records(spec, prompt_sets), max_examples)


def reference_records(spec: Optional[str], prompt_sets: dict[str, Any], config: AGLConfig,
                      max_examples: Optional[int]) -> Optional[list[dict]]:
    if spec is None:
        return None
    if config.basis != "kfac":
        raise ValueError("--reference-data builds the contrastive K-FAC input basis: use it with --basis kfac.")
    safe = [r for r in load_records(spec, prompt_sets, default_label="safe") if r["label"] == "safe"]
    if not safe:
        raise ValueError(f"--reference-data {spec!r} has no benign records (label 'safe' or no label column).")
    return safe[:max_examples] if max_examples else safe


def run(args: argparse.Namespace, pm: Any) -> int:
    _check_ints(args)
    config, est_name, estimator = mask_config(args, available_estimators(pm))
    prompt_sets = available_prompt_sets(pm)
    records = fisher_records(args.data, prompt_sets, args.max_examples)
    reference = reference_records(args.reference_data, prompt_sets, config, args.max_examples)
    job = FisherJob(args, config, est_name, estimator, records, reference, log=_log)
    print(job.run())
    return 0
