"""What the commands' parsers share: the help of a FILE|URL target and its --root, argument types, and adding a
command with its help and exit codes."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from rich.console import Console

TARGET_HELP = "a sweep YAML file, or the <root>/<sweep> URL of a run store"
ROOT_HELP = "run store URL when FILE was swept with --root"

Command = Callable[[argparse.Namespace, Console], int]  # a command's function: its exit code


def add_command(sub: Any, name: str, fn: Command | None, help: str, more: str) -> argparse.ArgumentParser:
    """Register a command on the CLI's subparsers: `help` in the list of commands, then `more` in its own --help."""
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help, description=f"{help}.\n\n{more}", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.set_defaults(fn=fn)
    return p


def positive(text: str) -> float:
    """A --interval value: seconds, more than zero."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value
