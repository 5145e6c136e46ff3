"""The sweep's results as `results`, `plot` and `report` show them: the table collected after asking the backends,
plain, grouped over seeds or pivoted, fitted to the terminal."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa
from rich.console import Console
from rich.table import Table
from rich.text import Text

from extrema.run.contract import StageState
from launch.addressed import FORMATS, Addressed
from launch.inputs.errors import UsageError
from launch.inputs.printable import printable
from launch.reconcile import Reconciled, reconcile
from launch.runstore import results, stage_records
from launch.views import aggregate, tables
from launch.views.tables import short_cell


def results_format(fmt: str | None, out_path: str | None) -> str:
    """The output format: as given, else from the --out suffix, else a table on the terminal."""
    if out_path is None:
        if fmt == "parquet":
            raise UsageError("--format parquet needs --out PATH")
        return fmt or "table"
    if fmt == "table":
        raise UsageError("--format table prints to the terminal; with --out use csv, parquet or json")
    inferred = FORMATS.get(Path(out_path.rstrip("/")).suffix.lower())
    if fmt is None and inferred is None:
        raise UsageError(f"cannot tell the format of --out {out_path}: give --format csv, parquet or json")
    return fmt or str(inferred)


def collect(target: Addressed, write: bool = True, fresh: bool = False) -> tuple[pa.Table, Reconciled, list[str]]:
    """The sweep's results table (a row per run and stage), after asking the backends about in-flight stages
    (their corrections recorded when `write` and the store takes them), and `path: reason` of every unreadable
    record (their fields are empty)."""
    keys = [k for r in target.runs for k in r.job_keys()]
    read = stage_records.read(target.url, keys, write=write, fresh=fresh)
    statuses = read.statuses
    seen = reconcile(target.url, statuses, target.launcher, target.manifest, write=write)
    problems = [*target.problems, *read.problems(), *seen.problems]
    for key, why in seen.corrected.items():
        statuses[key] = {**statuses[key], "state": seen.states[key], "error": why}
    for key in seen.holders:
        statuses[key] = {**statuses[key], "state": StageState.RUNNING}
    return results.collect(target.url, target.runs, statuses, problems, read), seen, problems


RUN_KEYS = 2  # run_id and stage lead every row of the plain results table

SWEEP = "sweep"  # the column naming each row's sweep (its URL) in a table of several sweeps


def collect_many(targets: Sequence[Addressed], fresh: bool = False) -> tuple[pa.Table, list[Reconciled], list[str]]:
    """The results of several sweeps as one table with a `sweep` column after the run and stage (each row's sweep
    URL; a swept axis for --group-by and --pivot), columns missing from a sweep empty; each sweep's reconciliation;
    every problem."""
    urls = [t.url for t in targets]
    twice = sorted({u for u in urls if urls.count(u) > 1})
    if twice:
        raise UsageError(f"the same sweep given twice: {', '.join(twice)}")
    parts, seen, problems = [], [], []
    for target in targets:
        table, reconciled, found = collect(target, fresh=fresh)
        parts.append(table.add_column(RUN_KEYS, SWEEP, pa.array([target.url] * table.num_rows, pa.string())))
        seen.append(reconciled)
        problems += found
    return pa.concat_tables(parts, promote_options="permissive"), seen, problems


@dataclass
class View:
    """A results view: the table written to files, and its header and cells for the terminal."""

    title: str
    table: pa.Table
    header: list[str]
    cells: list[list[str]]
    pairs: list[tuple[str, str | None]]
    keys: int = 0  # leading columns that name a group (never wrapped); 0: the plain results table
    turn: bool = False  # when too wide for the terminal, print one column per group and one row per column


def show_plain(out: Console, view: View) -> None:
    """Print the plain results table; too wide for the terminal, the columns every row shares become one line
    under it and the rest is split into tables that fit, each led by the run and the stage."""
    widths = tables.column_widths(view.header, view.cells)
    if len(view.cells) > tables.RICH_ROWS or tables.table_width(widths) <= out.width:
        tables.show(out, view.title, view.header, view.cells, pairs=view.pairs)
        return
    if len(view.cells) == 1:
        table = Table(title=view.title)
        table.add_column("column", style="bold", no_wrap=True)
        table.add_column("value")
        for name, value in zip(view.header, view.cells[0]):
            table.add_row(name, value)
        out.print(table)
        return
    same = set(tables.constant_columns(view.cells, start=RUN_KEYS))
    varying = [i for i in range(len(view.header)) if i not in same]
    chunks = tables.column_chunks([widths[i] for i in varying], keep=RUN_KEYS, width=out.width)
    for n, chunk in enumerate(chunks, start=1):
        title = view.title if len(chunks) == 1 else f"{view.title} ({n}/{len(chunks)})"
        table = Table(title=title)
        for j in chunk:
            table.add_column(view.header[varying[j]], no_wrap=j < RUN_KEYS)
        for row in view.cells:
            table.add_row(*(row[varying[j]] for j in chunk))
        out.print(table)
    if same:
        shared = " · ".join(f"{view.header[i]} {view.cells[0][i]}" for i in sorted(same))
        out.print(Text(f"the same in every row: {shared}"), soft_wrap=False)


def show_view(out: Console, view: View) -> None:
    """Print a results view; a summary too wide for the terminal is turned: a column per group, a row per metric."""
    view = replace(
        view,
        header=[printable(h) for h in view.header],
        cells=[[printable(c) for c in row] for row in view.cells],
    )
    if not view.keys:
        show_plain(out, view)
        return
    if len(view.cells) > tables.RICH_ROWS:
        tables.show(out, view.title, view.header, view.cells, pairs=view.pairs)
        return
    widths = tables.column_widths(view.header, view.cells)
    if not view.turn or tables.table_width(widths) <= out.width:
        table = Table(title=view.title)
        for i, name in enumerate(view.header):
            table.add_column(name, no_wrap=i < view.keys, justify="left" if i < view.keys else "right")
        for row in view.cells:
            table.add_row(*row)
    else:
        table = Table(title=view.title, show_header=False)
        table.add_column(style="bold", no_wrap=True)
        for _ in view.cells:
            table.add_column(justify="right")
        for i, name in enumerate(view.header):
            table.add_row(name, *(r[i] for r in view.cells), end_section=i == view.keys - 1)
    out.print(table)


def results_view(args: argparse.Namespace, url: str, table: pa.Table) -> View:
    """The plain table, its aggregate over seeds (--group-by) or one metric's pivot (--pivot)."""
    try:
        if args.group_by is not None:
            agg = aggregate.aggregate(table, args.group_by or None)
            header, cells = aggregate.summary(agg, digits=4)
            return View(f"{url}: mean ± std over seeds (n)", agg, header, cells, [], header.index("runs") + 1, True)
        if args.pivot is not None:
            rows, columns = args.pivot
            grid = aggregate.pivot(table, rows, columns, args.metric, args.stage)
            title = f"{url}: {grid.metric} ({grid.stage} stage), mean ± std over seeds (n)"
            return View(title, grid.to_arrow(), grid.header(), grid.text(digits=2), [], 1)
    except ValueError as e:
        raise UsageError(str(e)) from None
    records = table.to_pylist()
    cells = [[short_cell(v) for v in r.values()] for r in records]
    return View(url, table, table.column_names, cells, [(r["stage"], r["state"]) for r in records])
