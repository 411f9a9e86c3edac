"""`agl-trl sft|dpo`: TRL's own `trl sft` / `trl dpo` scripts with the AGLConfig options added as `--agl_<field>`."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from typing import Any, Optional, Sequence

from .args import SCRIPTS, check_no_unknown_agl, make_parser, resolve_config

USAGE = ("usage: agl-trl {sft,dpo} [TRL script arguments] [--agl_<option> ...] [accelerate launch arguments]\n"
         "  agl-trl sft --help   lists every option (TRL's, then the AGL group)")
# Set by `accelerate launch` (every launcher) and by torchrun: the script then trains in this process.
LAUNCHED_ENV = ("ACCELERATE_DYNAMO_BACKEND", "LOCAL_RANK", "TORCHELASTIC_RUN_ID")


def launched() -> bool:
    """True inside a process started by `accelerate launch` or `torchrun` (then no second launch)."""
    return any(name in os.environ for name in LAUNCHED_ENV)


def parse(script: str, argv: Sequence[str]) -> tuple[tuple[Any, ...], Any, list[str], list[str]]:
    """(TRL dataclasses, AGLArguments, unknown YAML strings, unknown CLI strings); unknown --agl_* raise."""
    parser = make_parser(script)
    *parsed, config_rest, cli_rest = parser.parse_args_and_config(
        list(argv), return_remaining_strings=True, separate_remaining_strings=True)
    _as_start_error(check_no_unknown_agl, config_rest, cli_rest)
    return tuple(parsed[:-1]), parsed[-1], list(config_rest), list(cli_rest)


def _as_start_error(fn: Any, *args: Any) -> Any:
    """fn(*args) with its ValueError re-raised as AGLStartError (reported as one line by `main`)."""
    from .autoattach import AGLStartError

    try:
        return fn(*args)
    except AGLStartError:
        raise
    except ValueError as err:
        raise AGLStartError(str(err)) from None


def run(script: str, argv: Sequence[str]) -> Optional[Any]:
    """Train in this process: TRL's stock `trl.scripts.<script>.main`, with AGL attached when any --agl_* is given.

    Returns the AGL adapter (None without AGL options). Unknown command-line arguments are an error, as in TRL's
    script; unknown YAML keys are ignored, as there.
    """
    from .autoattach import AGLStartError, AutoAttach

    trl_args, agl_args, _, cli_rest = parse(script, argv)
    if cli_rest:
        raise AGLStartError(f"Unrecognised arguments for `agl-trl {script}` inside a launched process: {cli_rest}.")
    config = _as_start_error(resolve_config, agl_args)
    trl_main = importlib.import_module(f"trl.scripts.{script}").main
    if config is None:
        trl_main(*trl_args)
        return None

    with AutoAttach(config) as auto:
        trl_main(*trl_args)
    if auto.adapter is None:
        raise AGLStartError(f"AGL was never attached: no training step of a transformers Trainer ran inside "
                            f"trl.scripts.{script}.main ({auto.forwards_seen} module forwards seen). Check "
                            "max_steps / the dataset size.")
    return auto.adapter


def remove_subsequence(items: Sequence[str], sub: Sequence[str]) -> list[str]:
    """`items` without the ordered subsequence `sub` (the strings argparse left over, in order)."""
    out, k = [], 0
    for item in items:
        if k < len(sub) and item == sub[k]:
            k += 1
        else:
            out.append(item)
    return out


def launch(script: str, argv: Sequence[str]) -> None:
    """Like `trl <script>`: options TRL's parser does not know go to `accelerate launch`, which starts
    `python -m agl_trl.cli <script> <the rest>` in each process. AGL options are checked here first."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    _, agl_args, config_rest, cli_rest = parse(script, argv)
    _as_start_error(resolve_config, agl_args)  # a bad value or mask fails now, not in every launched process
    launch_args = resolve_accelerate_config_argument(config_rest + cli_rest)
    script_args = remove_subsequence(list(argv), cli_rest)
    launch_command(launch_command_parser().parse_args(
        [*launch_args, "--module", "agl_trl.cli", script, *script_args]))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point `agl-trl`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if not argv or argv[0] not in SCRIPTS:
        given = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{USAGE}\nagl-trl: error: {given}; choose one of {', '.join(SCRIPTS)}.", file=sys.stderr)
        return 2
    from .autoattach import AGLStartError

    script, rest = argv[0], argv[1:]
    try:
        if launched():
            run(script, rest)
        else:
            launch(script, rest)
    except AGLStartError as err:  # AGL's own checks; TRL's and the libraries' errors keep their tracebacks
        if os.environ.get("AGL_DEBUG"):
            raise
        print(f"agl-trl: error: {err}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as err:  # a launched process failed and already printed why
        return err.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
