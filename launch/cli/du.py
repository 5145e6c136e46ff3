"""`extrema-launch du`: the bytes a sweep holds per run and stage, split into checkpoints, logs and other (a root:
per sweep)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console
from rich.text import Text

from launch.addressed import DAMAGED, OK
from launch.cli.arguments import add_command
from launch.cli.listed import Listed, add_store_target, listed_target
from launch.runstore import disk_usage
from launch.views import disk_view

HELP = "bytes per run and stage of a sweep (per sweep of a root): checkpoints, logs, other"
MORE = (
    "Checkpoints are the stages' ckpt/ folders, logs their logs/ folders and the sweep's logs/ (backend logs);\n"
    "everything else (records, metrics, exported weights, manifest, ledger, code snapshots) is other.\n"
    "One recursive listing of the store (on an object store one request per thousand objects); on this machine a\n"
    "link is counted as itself, never followed. Sizes are apparent sizes, in binary units (--json: bytes).\n"
    "Works on a read-only store; writes nothing.\n"
    "Exit codes: 0, 2 invalid input, 3 a folder could not be read (listed)."
)


def add_parser(sub: Any) -> None:
    """Register `du` on the CLI's subparsers."""
    p = add_command(sub, "du", cmd_du, HELP, MORE)
    add_store_target(p, roots_too=True)
    p.add_argument(
        "--json",
        action="store_true",
        help="the sizes as one JSON object on standard output (bytes; rows per run and stage, or per sweep)",
    )


def cmd_du(args: argparse.Namespace, out: Console) -> int:
    """Print the bytes of the sweep (or of each sweep of the root) the target names."""
    listed = listed_target(args.target, args.root)
    record = root_usage(out, listed, args.json) if listed.root else sweep_usage(out, listed, args.json)
    if args.json:
        sys.stdout.write(json.dumps(record, indent=1) + "\n")
    for p in listed.problems:
        out.print(Text(f"not counted: {p}", style="red"), soft_wrap=True, markup=False, highlight=False)
    return DAMAGED if listed.problems else OK


def sweep_usage(out: Console, listed: Listed, as_json: bool) -> dict[str, Any]:
    """One sweep's bytes, shown unless `as_json`; its JSON record."""
    ((url, files),) = listed.sweeps.items()
    usage = disk_usage.of_sweep(files)
    if not as_json:
        disk_view.show_sweep(out, url, usage)
    return disk_view.sweep_record(url, usage)


def root_usage(out: Console, listed: Listed, as_json: bool) -> dict[str, Any]:
    """A root's bytes per sweep, shown unless `as_json`; its JSON record (each sweep's rows included)."""
    usages = {url.rsplit("/", 1)[-1]: disk_usage.of_sweep(files) for url, files in listed.sweeps.items()}
    outside = disk_usage.tally(listed.outside)
    if not as_json:
        disk_view.show_root(out, listed.url, usages, outside)
    total = disk_usage.summed([*(u.total() for u in usages.values()), outside])
    sweeps = [{"sweep": name, **disk_view.sweep_record(url, usages[name])} for name, url in zip(usages, listed.sweeps)]
    return {"url": listed.url, "sweeps": sweeps, "outside": outside.record(), "total": total.record()}
