"""Aggregate a results table over seeds and pivot it: pure, torch-free, pyarrow in and pyarrow out.

`aggregate` groups the rows of `launch.runstore.results.collect` that differ only in seed (same stage, same value of
every other swept axis) and gives every numeric metric its mean, sample standard deviation (n - 1; null for one value)
and count of non-null values. Each group keeps what reproduces its numbers: its run ids, its seeds, and the
protocol and provenance columns whose value the whole group shares (null where its rows disagree).

`pivot` lays one metric out as a grid: one swept axis down the rows, another across the columns, each cell the
mean, std and count over seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from extrema.run.contract import StageState
from extrema.spec import Experiment
from launch.runstore import results

SECTIONS = frozenset({*Experiment.model_fields, "sweep"})  # `sweep`: the column of a table of several sweeps
NOT_METRICS = frozenset(results.TYPED) - {"elapsed_s"}
CARRIED = ("git_sha", "git_dirty", "world_size", "backend")
STATS = ("mean", "std", "count")


def swept_axes(table: pa.Table) -> list[str]:
    """The columns that hold swept values: paths into an experiment (`model.cls_token`, `pretrain.seed`, `stages`)."""
    return [c for c in table.column_names if c.split(".", 1)[0] in SECTIONS]


def seed_axes(axes: Sequence[str]) -> list[str]:
    """The axes that only reseed a run (`pretrain.seed`, `probe.seed`, ...)."""
    return [a for a in axes if a.rsplit(".", 1)[-1] == "seed"]


def metric_columns(table: pa.Table) -> list[str]:
    """Numeric result columns with a value: not a swept axis, not status or provenance, not part of a protocol."""
    skip = set(swept_axes(table)) | NOT_METRICS
    out = []
    for f in table.schema:
        numeric = pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
        empty = table.column(f.name).null_count == table.num_rows
        if numeric and not empty and f.name not in skip and not f.name.startswith("protocol."):
            out.append(f.name)
    return out


def value_key(value: Any) -> str:
    """A hashable, order-stable key of any cell value (lists and dicts included)."""
    return json.dumps(value, sort_keys=True, default=str)


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the values; None where undefined."""
    n = len(values)
    if n == 0:
        return None, None
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def _groups(
    records: list[dict[str, Any]], key_cols: Sequence[str], axes: Sequence[str]
) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(value_key([r.get(c) for c in key_cols]), []).append(r)
    for rows in groups.values():
        varying = [a for a in axes if a not in key_cols and len({value_key(r.get(a)) for r in rows}) > 1]
        if varying:
            where = ", ".join(f"{c}={rows[0].get(c)}" for c in key_cols)
            raise ValueError(
                f"runs grouped under ({where}) differ in {', '.join(varying)}, not only in seed: "
                "add those axes to the grouping"
            )
    return groups


def resolve_by(table: pa.Table, by: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """(grouping axes, seed axes averaged over): `by` checked against the swept axes, else every non-seed axis."""
    axes = swept_axes(table)
    seeds = seed_axes(axes)
    if by is None:
        return [a for a in axes if a not in seeds], seeds
    unknown = [b for b in by if b not in axes]
    if unknown:
        raise ValueError(f"not a swept axis: {', '.join(unknown)} (swept: {', '.join(axes) or 'none'})")
    return list(dict.fromkeys(by)), [s for s in seeds if s not in by]


def aggregate(table: pa.Table, by: Sequence[str] | None = None) -> pa.Table:
    """One row per stage and value of `by` (default: every swept axis but the seeds), averaged over seeds.

    Columns: stage, the `by` axes, `runs` (rows in the group), `completed`, `run_ids`, each seed axis as the list
    of its values, `<metric>.mean|std|count` for every numeric metric, then the shared protocol and provenance.
    ValueError when `by` names an unswept column, or leaves out an axis that varies within a group.
    """
    keep, seeds = resolve_by(table, by)
    key_cols = ["stage", *keep]
    metrics = metric_columns(table)
    carried = [c for c in table.column_names if c.startswith("protocol.")] + [
        c for c in CARRIED if c in table.column_names
    ]
    groups = _groups(table.to_pylist(), key_cols, [a for a in swept_axes(table) if a not in seeds])
    cols: dict[str, list[Any]] = {c: [] for c in key_cols}
    cols.update(runs=[], completed=[], run_ids=[])
    cols.update({s: [] for s in seeds})
    cols.update({f"{m}.{s}": [] for m in metrics for s in STATS})
    cols.update({c: [] for c in carried})
    for rows in groups.values():
        for c in key_cols:
            cols[c].append(rows[0].get(c))
        cols["runs"].append(len(rows))
        cols["completed"].append(sum(r.get("state") == StageState.COMPLETED for r in rows))
        cols["run_ids"].append([r["run_id"] for r in rows])
        for s in seeds:
            cols[s].append([r.get(s) for r in rows])
        for m in metrics:
            values = [float(r[m]) for r in rows if r.get(m) is not None]
            mean, std = mean_std(values)
            cols[f"{m}.mean"].append(mean)
            cols[f"{m}.std"].append(std)
            cols[f"{m}.count"].append(len(values))
        for c in carried:
            distinct = {value_key(r.get(c)) for r in rows}
            cols[c].append(rows[0].get(c) if len(distinct) == 1 else None)
    types = {f.name: f.type for f in table.schema}
    arrays = {}
    for name, values in cols.items():
        if name in types and name not in seeds:
            arrays[name] = pa.array(values, type=types[name])
        elif name.endswith(".count") or name in ("runs", "completed"):
            arrays[name] = pa.array(values, type=pa.int64())
        elif name.endswith((".mean", ".std")):
            arrays[name] = pa.array(values, type=pa.float64())
        elif name in seeds:
            arrays[name] = pa.array(values, type=pa.list_(types[name]))
        else:
            arrays[name] = pa.array(values)
    return pa.table(arrays)


def ordered_values(values: list[Any]) -> list[Any]:
    """Distinct values: sorted when all are numbers, else in order of first appearance."""
    distinct = list({value_key(v): v for v in values}.values())
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
        return sorted(distinct)
    return distinct


@dataclass(frozen=True)
class Pivot:
    """One metric over seeds on a grid: `rows` axis values down, `columns` axis values across."""

    rows: str
    columns: str
    metric: str
    stage: str
    row_values: list[Any]
    column_values: list[Any]
    mean: list[list[float | None]]
    std: list[list[float | None]]
    count: list[list[int]]

    def to_arrow(self) -> pa.Table:
        """The grid as a table: the row axis, then `<columns>=<value>` (mean), `.std` and `.count` per column."""
        out: dict[str, pa.Array] = {self.rows: pa.array(self.row_values)}
        for j, v in enumerate(self.column_values):
            name = f"{self.columns}={v}"
            out[name] = pa.array([row[j] for row in self.mean], pa.float64())
            out[f"{name}.std"] = pa.array([row[j] for row in self.std], pa.float64())
            out[f"{name}.count"] = pa.array([row[j] for row in self.count], pa.int64())
        return pa.table(out)

    def header(self) -> list[str]:
        """Column titles for a terminal table: `rows \\ columns`, then one per column value."""
        return [f"{self.rows} \\ {self.columns}", *(str(v) for v in self.column_values)]

    def text(self, digits: int = 2) -> list[list[str]]:
        """Terminal cells: `mean ± std (n)`, `mean (n=1)` for a single seed, `-` where no run has the metric."""
        lines = []
        for i, v in enumerate(self.row_values):
            cells = [str(v)]
            for m, s, n in zip(self.mean[i], self.std[i], self.count[i]):
                if m is None:
                    cells.append("-")
                elif s is None:
                    cells.append(f"{m:.{digits}f} (n={n})")
                else:
                    cells.append(f"{m:.{digits}f} ± {s:.{digits}f} (n={n})")
            lines.append(cells)
        return lines


def pivot(table: pa.Table, rows: str, columns: str, metric: str, stage: str | None = None) -> Pivot:
    """`metric` with axis `rows` down and axis `columns` across, mean/std/count over seeds in each cell.

    `stage` picks the stage when the metric is reported by several (e.g. `knn_top1` by pretrain and knn).
    ValueError for an unknown axis or metric, an ambiguous stage, or runs in one cell that differ in another axis.
    """
    if rows == columns:
        raise ValueError(f"rows and columns are the same axis {rows!r}")
    if metric not in metric_columns(table):
        raise ValueError(f"no numeric metric {metric!r} (metrics: {', '.join(metric_columns(table)) or 'none'})")
    agg = aggregate(table, [rows, columns])
    records = [r for r in agg.to_pylist() if r[f"{metric}.count"] > 0 and (stage is None or r["stage"] == stage)]
    stages = list(dict.fromkeys(r["stage"] for r in records))
    if not stages:
        raise ValueError(f"no completed run reports {metric}" + (f" in stage {stage}" if stage else ""))
    if len(stages) > 1:
        raise ValueError(f"{metric} is reported by stages {', '.join(stages)}: choose one")
    row_values, column_values = (
        ordered_values([r[rows] for r in records]),
        ordered_values([r[columns] for r in records]),
    )
    cells = {(value_key(r[rows]), value_key(r[columns])): r for r in records}
    grid: dict[str, list[list[Any]]] = {s: [] for s in STATS}
    for rv in row_values:
        for s in STATS:
            grid[s].append([])
        for cv in column_values:
            r = cells.get((value_key(rv), value_key(cv)))
            for s in STATS:
                grid[s][-1].append(r[f"{metric}.{s}"] if r else (0 if s == "count" else None))
    return Pivot(rows, columns, metric, stages[0], row_values, column_values, grid["mean"], grid["std"], grid["count"])


def summary(agg: pa.Table, digits: int = 4) -> tuple[list[str], list[list[str]]]:
    """An aggregated table for the terminal: (header, rows), each metric one `mean ± std (n)` cell.

    Metrics no group reports are left out; `-` marks a group without the metric.
    """
    names = agg.column_names
    metrics = [c.removesuffix(".mean") for c in names if c.endswith(".mean")]
    metrics = [m for m in metrics if any(agg.column(f"{m}.count").to_pylist())]
    keys = names[: names.index("runs")]
    header = [*keys, "runs", *metrics]
    lines = []
    for r in agg.to_pylist():
        cells = [("-" if r[k] is None else str(r[k])) for k in keys] + [f"{r['completed']}/{r['runs']}"]
        for m in metrics:
            mean, std, n = r[f"{m}.mean"], r[f"{m}.std"], r[f"{m}.count"]
            if mean is None:
                cells.append("-")
            else:
                cells.append(f"{mean:.{digits}g}" + (f" ± {std:.2g}" if std is not None else "") + f" (n={n})")
        lines.append(cells)
    return header, lines
