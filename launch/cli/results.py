"""`extrema-launch results`: the sweep's table (a row per run and stage), grouped over seeds or pivoted, printed or
written."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import pyarrow.compute as pc
from rich.console import Console

from launch.addressed import DAMAGED, OK, open_addressed, print_notes, print_unreadable
from launch.cli.arguments import add_command, add_target
from launch.inputs.errors import UsageError
from launch.runstore import results
from launch.sweepfile.model import STAGE_ORDER
from launch.views.results_view import collect, collect_many, results_format, results_view, show_view

HELP = "one table with a row per run and stage: swept values, metrics, provenance"
MORE = (
    "Several sweeps (FILE|URL ...) give one table with a `sweep` column, which --group-by and --pivot take as\n"
    "an axis.\n"
    "--group-by AXIS... gives one row per stage and value of those axes, each numeric metric as mean, sample\n"
    "std and count over the runs that differ only in seed; with no AXIS, every swept axis but the seeds.\n"
    "--pivot ROWS COLUMNS --metric M lays one metric out with one swept axis down and another across, each\n"
    "cell mean ± std (n) over seeds; --stage S picks the stage when several report M.\n"
    "--out writes csv, parquet or json (from --format, else the file's suffix) to any fsspec URL, atomically.\n"
    "Exit codes: 0 once the table is out (failed stages are rows too: see the state column), 2 invalid input,\n"
    "3 an unreadable record (listed; its fields are empty)."
)


def add_parser(sub: Any) -> None:
    """Register `results` on the CLI's subparsers."""
    p = add_command(sub, "results", cmd_results, HELP, MORE)
    add_target(p, many=True)
    p.add_argument("--format", choices=("table", "csv", "parquet", "json"), help="output format (default: table)")
    p.add_argument(
        "--fresh", action="store_true", help="read every stage's own records, not the ledger of completed stages"
    )
    p.add_argument("--out", help="write to this path or URL instead of the terminal")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--group-by", nargs="*", metavar="AXIS", help="aggregate over seeds, grouped by these axes")
    view.add_argument(
        "--pivot", nargs=2, metavar=("ROWS", "COLUMNS"), help="one metric: ROWS axis down, COLUMNS across"
    )
    p.add_argument("--code", metavar="ID", help="only stages that ran this code snapshot (an id or its start)")
    p.add_argument("--metric", help="the metric of --pivot (e.g. knn_top1)")
    p.add_argument("--stage", choices=STAGE_ORDER, help="the stage of --pivot's metric, when several report it")


def cmd_results(args: argparse.Namespace, out: Console) -> int:
    """The results table of a sweep (or its aggregate over seeds, or a pivot), printed or written."""
    fmt = results_format(args.format, args.out)
    if args.pivot is None and (args.metric or args.stage):
        raise UsageError("--metric and --stage go with --pivot ROWS COLUMNS")
    if args.pivot is not None and not args.metric:
        raise UsageError("--pivot ROWS COLUMNS needs --metric M (the metric in the cells)")
    targets = [open_addressed(t, args.root) for t in args.target]
    if len(targets) == 1:
        table, one, problems = collect(targets[0], fresh=args.fresh)
        seen = [one]
    else:
        table, seen, problems = collect_many(targets, fresh=args.fresh)
    if args.code:
        table = table.filter(pc.starts_with(table.column("code").fill_null(""), args.code))
    view = results_view(args, ", ".join(t.url for t in targets), table)
    if args.out:
        try:
            results.write(view.table, args.out, fmt)  # type: ignore[arg-type]
        except (OSError, ImportError, ValueError) as e:
            raise UsageError(f"cannot write --out {args.out}: {type(e).__name__}: {e}") from None
        out.print(f"wrote {view.table.num_rows} rows x {view.table.num_columns} columns to {args.out}")
    elif fmt == "table":
        show_view(out, view)
    else:
        sys.stdout.write(results.encode(view.table, fmt).decode())  # type: ignore[arg-type]
    beside = Console(stderr=True) if fmt != "table" and not args.out else out  # standard output carries the data
    for reconciled in seen:
        print_notes(beside, reconciled)
    print_unreadable(beside, problems)
    return DAMAGED if problems else OK
