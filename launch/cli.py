"""The `dualmoe` command: one argparse sub-command per module listed in `COMMANDS`.

A command module defines

    HELP: str                                       one line for `dualmoe --help`
    add_arguments(parser: ArgumentParser) -> None   its flags
    run(args: Namespace) -> int                     the work; returns the exit status

and keeps heavy imports (torch, deepspeed) inside `run`, so `dualmoe --help` stays fast. To add a
command, add one line to `COMMANDS`. Bad input exits with status 2 and a message naming the flag, the
value and what is allowed: argparse does this for flag syntax; `run` raises `ConfigError` or
`ScheduleError` (or `argparse.ArgumentTypeError`) for values found invalid later, and `main` turns
those into the same form.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

from dualmoe import __version__
from dualmoe.errors import ConfigError, ScheduleError

__all__ = ["COMMANDS", "build_parser", "main"]

# name -> module; the order is the order in `dualmoe --help`.
COMMANDS: dict[str, str] = {
    "schedule": "dualmoe.launch.schedule_cmd",
    "plan": "dualmoe.launch.plan_cmd",
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of `COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="dualmoe", description="DualPipe/DualPipeV pipeline schedules and EPLB-balanced MoE for DeepSpeed.")
    parser.add_argument("--version", action="version", version=f"dualmoe {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=(module.__doc__ or module.HELP).strip(),
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(command_run=module.run, command_parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `dualmoe` command line (`argv` defaults to sys.argv[1:]); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        try:
            return int(args.command_run(args))
        except (ConfigError, ScheduleError, argparse.ArgumentTypeError) as exc:
            args.command_parser.error(str(exc))  # prints usage and the message, exits with status 2
    except SystemExit as exc:  # argparse: 2 for bad input, 0 for --help/--version
        if isinstance(exc.code, int) or exc.code is None:
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    return 0  # not reached: error() always exits
