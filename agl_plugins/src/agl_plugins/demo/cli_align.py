"""`agl align-base`: reproduce the shipped aligned-base adapter (data/aligned-v1) from the packaged model."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = "Train the refusal adapter that turns SmolLM2-135M-Instruct into the demo's aligned base (seeded)."


def add_arguments(parser: argparse.ArgumentParser, pm: Any) -> None:
    parser.add_argument("--out", required=True, help="Folder for the adapter (PEFT format); replaced atomically.")
    parser.add_argument("--regenerate", action="store_true", help="Generate the model's answers to the ordinary "
                        "prompts anew instead of reusing those in the shipped training_rows.jsonl (they differ: 381 "
                        "of them were generated with 64 new tokens, the recipe now uses 48).")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default: %(default)s, the setting the shipped adapter was trained "
                             "with; also the fastest on a busy machine).")


def run(args: argparse.Namespace, pm: Any) -> int:
    import torch

    from .align import train_adapter

    if args.threads < 1:
        raise ValueError(f"--threads={args.threads} is invalid: must be ≥ 1.")
    torch.set_num_threads(args.threads)
    out = train_adapter(Path(args.out), regenerate=args.regenerate)
    print(f"Saved the aligned-base adapter: {out}\nUse it with: agl demo (after copying it over "
          f"agl_plugins/src/agl_plugins/data/aligned-v1, or see ensure_aligned_base(adapter=...)).")
    return 0
