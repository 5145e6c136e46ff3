"""`extrema-launch report`: one self-contained HTML page of a sweep."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from extrema.run.contract import os_reason
from launch.addressed import DAMAGED, OK, open_addressed, print_unreadable
from launch.cli.arguments import add_command, add_target
from launch.inputs.errors import UsageError

HELP = "write one self-contained HTML page of a sweep"
MORE = (
    "The sweep and its axes, the status table, results averaged over seeds, every figure of `plot`, the\n"
    "runs' attention maps and inpainting pictures, and provenance, in one file that opens without a network.\n"
    "Exit codes: 0, 2 invalid input."
)


def add_parser(sub: Any) -> None:
    """Register `report` on the CLI's subparsers."""
    p = add_command(sub, "report", cmd_report, HELP, MORE)
    add_target(p)
    p.add_argument("--out", required=True, metavar="PATH", help="the HTML file (a path or URL)")


def cmd_report(args: argparse.Namespace, out: Console) -> int:
    """Write one self-contained HTML file of the sweep: status, results, figures, pictures, provenance (nothing
    written into the run store); exit 3 when a record or picture of it is unreadable (listed)."""
    from launch.views import report  # figures and pictures: only here

    target = open_addressed(args.target, args.root)
    page, problems = report.render(target)
    try:
        size = report.write(args.out, page)
    except OSError as e:
        raise UsageError(f"cannot write --out {args.out}: {os_reason(e)}") from None
    out.print(f"wrote {args.out} ({size / 1e6:.1f} MB), a page that needs no network")
    print_unreadable(out, problems)
    return DAMAGED if problems else OK
