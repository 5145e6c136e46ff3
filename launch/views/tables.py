"""Tables on the terminal: rich tables for what a person reads row by row, aligned plain text for big sweeps.

Rich lays a table out cell by cell, which takes seconds past a few thousand rows; a sweep of 10,000 runs is
shown instead as a rich summary (stage x state counts) followed by every row as aligned text in one write.
Every value shown goes through `cell` (and every row through `show`), which print control characters as visible
escapes: a swept value holding `\x1b[31m` or an OSC title sequence is shown as text, never obeyed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from extrema.run.contract import StageState
from launch.inputs.printable import printable, printable_lines

RICH_ROWS = 1000
MAX_WIDTH = 60
STATE_STYLES: dict[str, str] = {
    StageState.COMPLETED: "green",
    StageState.FAILED: "red",
    StageState.RUNNING: "cyan",
    StageState.CANCELLED: "yellow",
    StageState.PREEMPTED: "yellow",
}


def cell(value: Any) -> str:
    """A value as table text: '-' for missing ones, control characters shown as escapes (`\x1b`)."""
    return "-" if value is None else printable(str(value))


def short_cell(value: Any) -> str:
    """A value as terminal text: like cell, floats to 4 significant digits (whole numbers past 10,000) and
    times to the second."""
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return cell(value)


def column_widths(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[int]:
    """The width of each column: its longest text, header included."""
    return [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(columns)]


def table_width(widths: Sequence[int]) -> int:
    """Characters a rich table with these column widths takes (borders and one space of padding each side)."""
    return sum(widths) + 3 * len(widths) + 1


def constant_columns(rows: Sequence[Sequence[str]], start: int) -> list[int]:
    """Indices from `start` on of the columns whose text is the same in every row (none for fewer than 2 rows)."""
    if len(rows) < 2:
        return []
    return [i for i in range(start, len(rows[0])) if all(r[i] == rows[0][i] for r in rows)]


def column_chunks(widths: Sequence[int], keep: int, width: int) -> list[list[int]]:
    """Column indices split into tables that fit `width`, each led by the first `keep` columns; a column too
    wide for any table still gets one (rich wraps it)."""
    chunks: list[list[int]] = []
    current: list[int] = []
    lead = list(range(keep))
    for i in range(keep, len(widths)):
        if current and table_width([widths[j] for j in [*lead, *current, i]]) > width:
            chunks.append([*lead, *current])
            current = []
        current.append(i)
    if current or not chunks:
        chunks.append([*lead, *current])
    return chunks


def _plain(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    clipped = [[v if len(v) <= MAX_WIDTH else v[: MAX_WIDTH - 3] + "..." for v in row] for row in rows]
    widths = column_widths(columns, clipped)
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in clipped]
    return "\n".join(lines)


def summary(title: str, pairs: Sequence[tuple[str, str | None]]) -> Table:
    """Counts of (stage, state) pairs: one row per stage, one column per state."""
    counts = Counter((stage, state or "-") for stage, state in pairs)
    stages = list(dict.fromkeys(stage for stage, _ in pairs))
    states = sorted({state for _, state in counts}, key=lambda s: (s not in STATE_STYLES, s))
    table = Table(title=title or None)
    for col in ("stage", *states, "total"):
        table.add_column(col, justify="left" if col == "stage" else "right", style=STATE_STYLES.get(col))
    for stage in stages:
        row = [counts[(stage, s)] for s in states]
        table.add_row(stage, *(str(n) for n in row), str(sum(row)))
    return table


def show(
    out: Console,
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[str]],
    styles: Sequence[dict[str, str]] | None = None,
    pairs: Sequence[tuple[str, str | None]] = (),
) -> None:
    """Print rows as a rich table (cell styles by column name per row), or, past RICH_ROWS rows, the summary of
    `pairs` (stage, state) and every row as aligned text."""
    rows = [[printable_lines(v) for v in row] for row in rows]  # cells made elsewhere are shown safely too
    columns, title = [printable(c) for c in columns], printable(title)
    if len(rows) <= RICH_ROWS:
        table = Table(title=title)
        for col in columns:
            table.add_column(col)
        for i, row in enumerate(rows):
            style = styles[i] if styles else {}
            table.add_row(*(Text(v, style=style.get(c, "")) for c, v in zip(columns, row)))
        out.print(table)
        return
    out.print(Text(f"{title}: {len(rows)} rows", style="bold"), soft_wrap=True)
    if pairs:
        out.print(summary("", pairs))
    out.out(_plain(columns, rows), highlight=False)
