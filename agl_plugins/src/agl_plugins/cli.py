"""The `agl` command line: one subcommand per module (fisher, drift, report, forgetting, demo, align-base, benchmark)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Optional, Sequence

# subcommand → module exposing HELP, add_arguments(parser, pm) and run(args, pm) -> int
SUBCOMMANDS = {
    "fisher": "agl_plugins.cli_fisher",
    "drift": "agl_plugins.drift.cli",
    "report": "agl_plugins.drift.cli_report",
    "forgetting": "agl_plugins.forgetting.cli",
    "demo": "agl_plugins.demo.cli",
    "align-base": "agl_plugins.demo.cli_align",
    "benchmark": "agl_plugins.demo.benchmark",
}
DEBUG_ENV = "AGL_DEBUG"  # set to 1 to see the traceback behind an input error


def build_parser(pm) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agl", description="AlignGuard-LoRA (reconstructed): estimate alignment Fisher masks and check drift."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub_parser = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub_parser, pm)
        sub_parser.set_defaults(run=module.run)
    return parser


def _fail(message: str) -> int:
    one_line = " ".join(str(message).split())
    print(f"agl: error: {one_line}", file=sys.stderr)
    return 2


def main(argv: Optional[Sequence[str]] = None, *, pm=None) -> int:
    """Entry point of the `agl` console script; bad input → one line on stderr and exit code 2.

    pm: a plugin manager to use instead of a new `get_plugin_manager()` (e.g. with extra plugins registered).
    """
    from .manager import get_plugin_manager

    try:
        pm = pm if pm is not None else get_plugin_manager()
        args = build_parser(pm).parse_args(argv)
        return int(args.run(args, pm) or 0)
    except (ValueError, OSError) as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        return _fail(str(exc))
    except KeyboardInterrupt:
        print("agl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
