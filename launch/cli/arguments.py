"""What the commands' parsers share: the FILE|URL target with its --root (and --run), argument types, and adding a
command with its help and exit codes."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any, Literal

from rich.console import Console

from launch.inputs.errors import UsageError
from launch.runstore.store import StoredRun

TARGET_HELP = "a sweep YAML file, or the <root>/<sweep> URL of a run store"
ROOT_HELP = "run store URL when FILE was swept with --root"
RUN_HELP = "run id, or a prefix of one that no other run of the sweep shares"

Command = Callable[[argparse.Namespace, Console], int]  # a command's function: its exit code


def add_command(
    sub: Any, name: str, fn: Command | None, help: str, more: str = "", description: str | None = None
) -> argparse.ArgumentParser:
    """Register a command on subparsers (the CLI's, or a command's own): `help` in the list of commands, then
    `description` (else `help` and `more`) in its own --help."""
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help,
        description=f"{help}.\n\n{more}" if description is None else description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(fn=fn)
    return p


def add_sweep_file(p: argparse.ArgumentParser, overrides_help: str) -> None:
    """A sweep YAML file and its KEY=VALUE overrides (`sweep`, `check`)."""
    p.add_argument("file", help="sweep YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)


def add_target(p: argparse.ArgumentParser, run: Literal["required", "only"] | None = None, many: bool = False) -> None:
    """The sweep a command addresses: FILE|URL and its --root; with `run`, --run too (the one run the command is
    about, or "only" that run of the sweep); `many`: one or more sweeps (a list)."""
    p.add_argument("target", metavar="FILE|URL", nargs="+" if many else None, help=TARGET_HELP)
    if run == "required":
        p.add_argument("--run", required=True, help=RUN_HELP)
    elif run == "only":
        p.add_argument("--run", help="only this run: " + RUN_HELP)
    p.add_argument("--root", help=ROOT_HELP)


def run_named(runs: Sequence[StoredRun], given: str, url: str) -> StoredRun:
    """The run whose id is `given` or starts with it (a unique prefix); UsageError naming the candidates else."""
    exact = [r for r in runs if r.run_id == given]
    found = exact or ([r for r in runs if r.run_id.startswith(given)] if given else [])
    if len(found) == 1:
        return found[0]
    if not found:
        raise UsageError(f"run {given!r} is not part of {url} (no run id starts with it)")
    ids = ", ".join(r.run_id for r in found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    raise UsageError(f"run {given!r} is ambiguous in {url}: {ids} start with it; give more of the id")


def positive(text: str) -> float:
    """A --interval value: seconds, more than zero."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value
