"""What `du` and `gc` show: bytes per run and stage (or per sweep of a root) split into checkpoints, logs and other,
and the checkpoint folders gc removes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from launch.runstore.checkpoint_gc import Plan
from launch.runstore.disk_usage import KINDS, SWEEP_OWN, SweepUsage, Tally, summed
from launch.views import tables
from launch.views.tables import cell

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
COUNTS = ("files", *KINDS, "total")


def human(n: int) -> str:
    """Bytes in binary units to three significant digits: `512 B`, `1.50 KiB`, `23.4 GiB`."""
    value, unit = float(n), 0
    while value >= 1024 and unit < len(UNITS) - 1:
        value, unit = value / 1024, unit + 1
    if unit == 0:
        return f"{n} B"
    return f"{value:.3g} {UNITS[unit]}" if value < 1000 else f"{value:.0f} {UNITS[unit]}"


def counts(t: Tally) -> list[str]:
    """A tally's cells: files, then each kind and the total in bytes."""
    return [str(t.files), *(human(getattr(t, k)) for k in KINDS), human(t.total)]


def show_table(out: Console, title: str, lead: Sequence[str], rows: Sequence[Sequence[str]], total: Tally) -> None:
    """Rows led by `lead` columns, the counts right-aligned, a total row last (aligned text past RICH_ROWS rows)."""
    last = ["total", *[""] * (len(lead) - 1), *counts(total)]
    if len(rows) >= tables.RICH_ROWS:
        tables.show(out, title, (*lead, *COUNTS), [*rows, last])
        return
    table = Table(title=cell(title), show_footer=False)
    for c in lead:
        table.add_column(c)
    for c in COUNTS:
        table.add_column(c, justify="right")
    for row in rows:
        table.add_row(*(cell(v) for v in row))
    table.add_section()
    table.add_row(*(Text(v, style="bold") for v in last))
    out.print(table)


def sweep_rows(usage: SweepUsage) -> list[list[str]]:
    """One row per run and stage, then the sweep's own folders."""
    keys = sorted(usage.rows, key=lambda k: (k[0] == SWEEP_OWN, k))
    return [[run, stage, *counts(usage.rows[(run, stage)])] for run, stage in keys]


def show_sweep(out: Console, url: str, usage: SweepUsage) -> None:
    """The bytes of one sweep by run and stage."""
    total = usage.total()
    title = f"{url}: {human(total.total)} in {total.files} files, {len(usage.runs)} run(s)"
    show_table(out, title, ("run", "stage"), sweep_rows(usage), total)


def show_root(out: Console, url: str, usages: dict[str, SweepUsage], outside: Tally) -> None:
    """The bytes of a root's sweeps, one row each, and of its files outside any sweep."""
    rows = [[name, str(len(u.runs)), *counts(u.total())] for name, u in usages.items()]
    if outside.files:
        rows.append(["(outside sweeps)", "-", *counts(outside)])
    total = summed([*(u.total() for u in usages.values()), outside])
    title = f"{url}: {human(total.total)} in {total.files} files, {len(usages)} sweep(s)"
    show_table(out, title, ("sweep", "runs"), rows, total)
    out.print(Text("extrema-launch du <root>/<sweep> shows one by run and stage", style="dim"))


def sweep_record(url: str, usage: SweepUsage) -> dict[str, Any]:
    """One sweep's bytes as JSON: its rows (run, stage, files, each kind, total) and its total."""
    rows = [{"run": r, "stage": s, **usage.rows[(r, s)].record()} for r, s in sorted(usage.rows)]
    return {"url": url, "runs": len(usage.runs), "rows": rows, "total": usage.total().record()}


def show_plan(out: Console, plan: Plan, removing: bool) -> None:
    """The folders gc removes (or would) from one sweep, with why and their bytes, and the stages left alone."""
    rows = [
        [*r.key.split("/", 1), f.path.split("/", 2)[2], f.why, human(f.size)] for r in plan.removals for f in r.folders
    ]
    verb = "removing" if removing else "would remove"
    if rows:
        title = f"{plan.sweep}: {verb} {len(rows)} folder(s), {human(plan.size)}"
        tables.show(out, title, ("run", "stage", "folder", "why", "bytes"), rows)
    else:
        out.print(Text(f"{plan.sweep}: no checkpoint beyond its stage's retention", style="green"), soft_wrap=True)
    for key, why in plan.skipped.items():
        out.print(Text(f"{key}: left as it is: {why}", style="yellow"), soft_wrap=True, markup=False, highlight=False)
