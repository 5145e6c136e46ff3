"""Figures of a sweep, torch-free (matplotlib imported on first use, rendered with Agg): PNG and SVG.

Figure 1 (`plot_curves`): training loss and kNN accuracy against epoch from each run's pretrain `metrics.jsonl`,
one line per value of an axis (default `model.cls_token`) with the mean over seeds and a band of one standard
deviation. `plot_metric`: a result metric against a swept axis with error bars over seeds. `plot_sweep` draws
every figure a sweep has data for. Each function returns the plotted numbers with the files it wrote, and every
figure names its sweep and run ids in the caption.

Several sweeps (`plot_sweeps`, `curves_of`, `plot_curves_of`) draw as one: each sweep is named by the shortest end
of its URL that no other of them shares (`sweep_names`), the results table's `sweep` column holds that name (an
axis like the swept ones), Figure 1 has a line per sweep and value, and run ids read `<sweep name>/<run id>`.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from extrema.run import contract, metrics_log
from extrema.run.contract import StageDir
from extrema.viz import figures
from launch.runstore import results, store
from launch.views import aggregate
from launch.views.results_view import SWEEP

CURVE_METRICS = ("loss", "knn_top1")
RESULT_METRICS = (
    "knn_top1",
    "knn_gain_top1",
    "probe_top1",
    "finetune_top1",
    "inpaint_relative_mse_r75",
    "locality_jaccard",
    "locality_corloc",
)
LOCALITY_METRICS = ("locality_jaccard", "locality_corloc")
LABELS = {
    "loss": "training loss",
    "knn_top1": "kNN top-1 accuracy (%)",
    "knn_gain_top1": "kNN top-1 gain over init (points)",
    "probe_top1": "linear probe top-1 (%)",
    "finetune_top1": "finetune top-1 (%)",
    "inpaint_relative_mse_r75": "inpainting MSE at 75% masking / mean-image MSE",
    "locality_jaccard": "Jaccard of the [cls] attention vs object masks (%)",
    "locality_corloc": "CorLoc of the [cls] attention (%)",
    "model.cls_token": "class token",
    "pretrain.masking.ratio": "masking ratio",
    "pretrain.masking.num_masks": "number of masks",
    "pretrain.seed": "seed",
    SWEEP: "sweep",
}
_READERS = 16

Sweeps = Sequence[tuple[str, Sequence[store.StoredRun]]]  # each sweep of a figure: its URL and its runs


def label(name: str) -> str:
    """A readable name for a metric or axis."""
    return LABELS.get(name, name)


def short(name: str) -> str:
    """The last part of a dotted axis path (`model.cls_token` -> `cls_token`)."""
    return name.rsplit(".", 1)[-1]


def sweep_names(urls: Sequence[str]) -> dict[str, str]:
    """Each of several distinct sweep URLs -> the shortest end of its path that no other of them ends with: the
    sweep's name where that is unique (`/a/runs/abl`, `s3://b/abl-2` -> `abl`, `abl-2`), else more of the path
    (`/a/runs/abl`, `/b/runs/abl` -> `a/runs/abl`, `b/runs/abl`)."""
    parts = {u: u.rstrip("/").split("/") for u in urls}
    names = {}
    for url, mine in parts.items():
        for n in range(1, len(mine) + 1):
            tail = mine[-n:]
            if not any(other[-n:] == tail for u, other in parts.items() if u != url):
                break
        names[url] = "/".join(tail)
    return names


def qualified(sweep: str, run_id: str) -> str:
    """A run id as figures of several sweeps name it, `<sweep name>/<run id>`; the bare id where `sweep` is ""."""
    return f"{sweep}/{run_id}" if sweep else run_id


def named_sweeps(table: pa.Table, names: Mapping[str, str]) -> pa.Table:
    """A results table of several sweeps (a `sweep` column of URLs) with each URL replaced by its name in `names`
    and each run id qualified by it, as the figures show them."""
    urls = table.column(SWEEP).to_pylist()
    ids = [qualified(names[u], r) for u, r in zip(urls, table.column("run_id").to_pylist())]
    table = table.set_column(table.column_names.index(SWEEP), SWEEP, pa.array([names[u] for u in urls], pa.string()))
    return table.set_column(table.column_names.index("run_id"), "run_id", pa.array(ids, pa.string()))


@dataclass(frozen=True)
class Series:
    """One plotted line: x values and, at each, the mean, sample std (None below two values) and count over runs."""

    label: str
    x: list[Any]
    mean: list[float]
    std: list[float | None]
    count: list[int]
    run_ids: list[str]


@dataclass(frozen=True)
class Plotted:
    """A figure: the files written, the caption, and the series of each panel (panel name -> lines)."""

    name: str
    files: list[str]
    caption: str
    panels: dict[str, list[Series]]


# --------------------------------------------------------------------------------------------- the data


Member = tuple[str, store.StoredRun]  # a run of a figure with its sweep's name ("" where one sweep is drawn)


def line_keys(runs: Sequence[Member], axis: str) -> dict[str, tuple[str, list[Member]]]:
    """Runs grouped into lines: by `axis`, their sweep (of several) and every other non-seed swept value;
    key -> (label, runs)."""
    flat = [results.flatten(r.overrides) for _, r in runs]
    paths = list(dict.fromkeys(p for f in flat for p in f))
    others = [p for p in paths if p != axis and p not in aggregate.seed_axes(paths)]
    lines: dict[str, tuple[str, list[Member]]] = {}
    for (sweep, r), f in zip(runs, flat):
        parts = [(axis, f[axis])] if axis in f else []
        if sweep:
            parts.insert(0 if axis == SWEEP else len(parts), (SWEEP, sweep))
        parts += [(p, f.get(p)) for p in others]
        key = aggregate.value_key(parts)
        text = str(parts[0][1]) if len(parts) == 1 and parts[0][0] == axis else ""
        text = text or ", ".join(f"{short(p)}={v}" for p, v in parts) or "all runs"
        lines.setdefault(key, (text, []))[1].append((sweep, r))
    return lines


def read_metrics(sweep_url: str, runs: Sequence[store.StoredRun], stage: str = "pretrain") -> dict[str, list[dict]]:
    """Each run's `<stage>/metrics.jsonl` records (empty when absent), by run id."""
    urls = [StageDir(store.stage_url(sweep_url, r.run_id, stage)).metrics for r in runs]
    tree = store.real_tree(sweep_url)

    def read(url: str) -> list[dict]:
        try:
            return metrics_log.read_records(url, tree)  # bounded, depth-checked, never through a link out
        except contract.Unreadable:
            return []

    with ThreadPoolExecutor(_READERS) as pool:
        docs = list(pool.map(read, urls))
    return {r.run_id: d for r, d in zip(runs, docs)}


def mean_series(text: str, points: Mapping[str, Mapping[int, tuple[float, float]]]) -> Series:
    """Per-run {step: (epoch, value)} -> the mean line over runs at each step any of them logged."""
    steps = sorted({s for per_run in points.values() for s in per_run})
    x, mean, std, count = [], [], [], []
    for s in steps:
        values = [per_run[s][1] for per_run in points.values() if s in per_run]
        m, sd = aggregate.mean_std(values)
        x.append(next(per_run[s][0] for per_run in points.values() if s in per_run))
        mean.append(m if m is not None else float("nan"))
        std.append(sd)
        count.append(len(values))
    return Series(text, x, mean, std, count, list(points))


def curves(
    sweep_url: str,
    runs: Sequence[store.StoredRun],
    axis: str = "model.cls_token",
    metrics: Iterable[str] = CURVE_METRICS,
) -> dict[str, list[Series]]:
    """metric -> one Series per line (see `line_keys`) against epoch, from the runs' pretrain metrics.jsonl."""
    return curves_of([(sweep_url, runs)], axis, metrics)


def curves_of(
    sweeps: Sweeps, axis: str = "model.cls_token", metrics: Iterable[str] = CURVE_METRICS
) -> dict[str, list[Series]]:
    """`curves` of one or more sweeps, each sweep's runs read from its own store; with several, a line per sweep
    and value (see `line_keys`) and run ids qualified by the sweep's name."""
    names = sweep_names([url for url, _ in sweeps]) if len(sweeps) > 1 else {}
    members: list[Member] = []
    logs: dict[str, list[dict]] = {}
    for url, runs in sweeps:
        read = read_metrics(url, [r for r in runs if "pretrain" in r.stages])
        name = names.get(url, "")
        members += [(name, r) for r in runs if r.run_id in read]
        logs.update({qualified(name, i): records for i, records in read.items()})
    out: dict[str, list[Series]] = {}
    for metric in metrics:
        lines = []
        for text, group in line_keys(members, axis).values():
            points = {
                qualified(sweep, r.run_id): {
                    int(rec["step"]): (float(rec.get("epoch", rec["step"])), float(rec[metric]))
                    for rec in logs[qualified(sweep, r.run_id)]
                    if isinstance(rec.get(metric), (int, float)) and "step" in rec
                }
                for sweep, r in group
            }
            points = {k: v for k, v in points.items() if v}
            if points:
                lines.append(mean_series(text, points))
        if lines:
            out[metric] = lines
    return out


def metric_series(table: pa.Table, axis: str, metric: str, stage: str | None = None) -> tuple[str, list[Series]]:
    """(stage, lines) of `metric` against `axis` over seeds; one line per combination of the other swept axes."""
    agg = aggregate.aggregate(table)
    rows = [r for r in agg.to_pylist() if r.get(f"{metric}.count") and (stage is None or r["stage"] == stage)]
    stages = list(dict.fromkeys(r["stage"] for r in rows))
    if len(stages) != 1:
        found = ", ".join(stages) or "none"
        raise ValueError(f"{metric} must come from one stage (found: {found}); choose the stage")
    keep, _ = aggregate.resolve_by(table, None)
    if axis not in keep:
        raise ValueError(f"{axis} is not a swept axis (swept: {', '.join(keep) or 'none'})")
    others = [a for a in keep if a != axis]
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        text = str(r[others[0]]) if len(others) == 1 else ", ".join(f"{short(a)}={r[a]}" for a in others)
        text = text or label(metric)
        lines.setdefault(text, []).append(r)
    order = [aggregate.value_key(v) for v in aggregate.ordered_values([r[axis] for r in rows])]
    out = []
    for text, members in lines.items():
        members = sorted(members, key=lambda r: order.index(aggregate.value_key(r[axis])))
        out.append(
            Series(
                text,
                [m[axis] for m in members],
                [m[f"{metric}.mean"] for m in members],
                [m[f"{metric}.std"] for m in members],
                [m[f"{metric}.count"] for m in members],
                [i for m in members for i in m["run_ids"]],
            )
        )
    return stages[0], out


# ------------------------------------------------------------------------------------------------ drawing


def caption(sweep_name: str | Sequence[str], run_ids: Sequence[str], what: str) -> str:
    """`sweep NAME · what · N runs: id, id, ...` (`sweeps NAME, NAME` for several), wrapped to the figure width."""
    ids = ", ".join(dict.fromkeys(run_ids))
    several = not isinstance(sweep_name, str) and len(sweep_name) > 1
    named = sweep_name if isinstance(sweep_name, str) else ", ".join(sweep_name)
    text = f"sweep{'s' if several else ''} {named} · {what} · {len(set(run_ids))} runs: {ids}"
    return "\n".join(textwrap.wrap(text, 150))


def _draw_line(ax: Any, s: Series, color: Any) -> None:
    ax.plot(s.x, s.mean, color=color, lw=1.6, label=f"{s.label} (n={max(s.count)})")
    if any(v is not None for v in s.std):
        lo = [m - (sd or 0.0) for m, sd in zip(s.mean, s.std)]
        hi = [m + (sd or 0.0) for m, sd in zip(s.mean, s.std)]
        ax.fill_between(s.x, lo, hi, color=color, alpha=0.2, lw=0)


def plot_curves(
    sweep_url: str,
    runs: Sequence[store.StoredRun],
    out_dir: str,
    axis: str = "model.cls_token",
    name: str = "fig1_curves",
) -> Plotted:
    """Figure 1: training loss and kNN top-1 against epoch, a line per value of `axis`, mean ± std over seeds."""
    return plot_curves_of([(sweep_url, runs)], out_dir, axis, name)


def plot_curves_of(sweeps: Sweeps, out_dir: str, axis: str = "model.cls_token", name: str = "fig1_curves") -> Plotted:
    """`plot_curves` of one or more sweeps: with several, a line per sweep and value, labelled with the sweep."""
    panels = curves_of(sweeps, axis)
    if not panels:
        raise ValueError("no run has pretrain metrics (loss or knn_top1) in its metrics.jsonl")
    fig = figures.new_figure(5.2 * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = _colors(max(len(lines) for lines in panels.values()))
    for ax, (metric, lines) in zip(axes, panels.items()):
        for i, s in enumerate(lines):
            _draw_line(ax, s, colors[i])
        ax.set_xlabel("epoch")
        ax.set_ylabel(label(metric))
        ax.set_title(label(metric))
        ax.grid(alpha=0.3)
    axes[-1].legend(title=label(axis), fontsize=8, title_fontsize=8)
    ids = [i for lines in panels.values() for s in lines for i in s.run_ids]
    text = caption(list(sweep_names([url for url, _ in sweeps]).values()), ids, "mean over seeds, band ±1 std")
    fig.suptitle(f"Training loss and kNN accuracy by {label(axis)}", fontsize=11)
    fig.text(0.0, -0.01, text, fontsize=7, va="top", ha="left", color="0.3")
    return Plotted(name, figures.save(fig, out_dir, name), text, panels)


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(max(n, 1))]


def plot_metric(
    table: pa.Table,
    axis: str,
    metric: str,
    out_dir: str,
    stage: str | None = None,
    sweep_name: str | Sequence[str] = "",
    name: str | None = None,
) -> Plotted:
    """`metric` against swept `axis`, mean with ±1 std error bars over seeds, a line per other-axis combination."""
    stage, lines = metric_series(table, axis, metric, stage)
    others = [a for a in aggregate.resolve_by(table, None)[0] if a != axis]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for s in lines for v in s.x)
    categories = aggregate.ordered_values([v for s in lines for v in s.x])
    fig = figures.new_figure(6.0, 4.2)
    ax = fig.subplots()
    colors = _colors(len(lines))
    width = 0.6 / max(len(lines), 1)
    for i, s in enumerate(lines):
        x = s.x if numeric else [categories.index(v) + (i - (len(lines) - 1) / 2) * width for v in s.x]
        err = [sd if sd is not None else 0.0 for sd in s.std]
        ax.errorbar(
            x, s.mean, yerr=err, color=colors[i], marker="o", capsize=4, lw=1.4, ls="-" if numeric else "none",
            label=f"{s.label} (n={max(s.count)})",
        )  # fmt: skip
    if not numeric:
        ax.set_xticks(range(len(categories)), [str(c) for c in categories])
        ax.set_xlim(-0.6, len(categories) - 0.4)
    ax.set_xlabel(label(axis))
    ax.set_ylabel(label(metric))
    ax.set_title(f"{label(metric)} by {label(axis)} · {stage} stage", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=", ".join(label(a) for a in others) or None, title_fontsize=8)
    name = name or f"{metric}_vs_{short(axis)}"
    ids = [i for s in lines for i in s.run_ids]
    text = caption(sweep_name or "?", ids, "mean over seeds, error bars ±1 std")
    fig.text(0.0, -0.01, text, fontsize=7, va="top", ha="left", color="0.3")
    return Plotted(name, figures.save(fig, out_dir, name), text, {metric: lines})


def _setting(row: dict[str, Any], axis: str) -> Any:
    """A swept axis's value in a result row; where the run left it at the base's, what the stage's protocol says
    it was (e.g. `locality.init` -> `protocol.init`), else "base"."""
    if row.get(axis) is not None:
        return row[axis]
    recorded = row.get(f"protocol.{axis.rsplit('.', 1)[-1]}")
    return "base" if recorded is None else recorded


def plot_locality(
    table: pa.Table, axis: str, out_dir: str, sweep_name: str | Sequence[str] = "", name: str = "fig2_locality"
) -> Plotted:
    """Figure 2: Jaccard and CorLoc of the class token's attention, grouped bars (mean ± std over seeds) by `axis`,
    one bar per combination of the other swept axes (e.g. pretrained vs random init); `n/a` where a design has
    no class token to query."""
    agg = [r for r in aggregate.aggregate(table).to_pylist() if r["stage"] == "locality"]
    if not agg:
        raise ValueError("no locality results")
    keep, _ = aggregate.resolve_by(table, None)
    others = [a for a in keep if a not in (axis, "stages")]
    xs = aggregate.ordered_values([r.get(axis) for r in agg])
    groups: dict[str, dict[str, dict[str, Any]]] = {}
    for r in agg:
        text = ", ".join(f"{short(a)}={_setting(r, a)}" for a in others) or "runs"
        groups.setdefault(text, {})[aggregate.value_key(r.get(axis))] = r
    fig = figures.new_figure(5.2 * len(LOCALITY_METRICS), 4.2)
    axes = fig.subplots(1, len(LOCALITY_METRICS), squeeze=False)[0]
    colors = _colors(len(groups))
    width = 0.8 / max(len(groups), 1)
    panels: dict[str, list[Series]] = {}
    from matplotlib.patches import Patch

    for ax, metric in zip(axes, LOCALITY_METRICS):
        panels[metric] = []
        for i, (text, by_x) in enumerate(groups.items()):
            rows = [by_x.get(aggregate.value_key(x), {}) for x in xs]
            mean = [r.get(f"{metric}.mean") for r in rows]
            std = [r.get(f"{metric}.std") for r in rows]
            count = [int(r.get(f"{metric}.count") or 0) for r in rows]
            offsets = [j + (i - (len(groups) - 1) / 2) * width for j in range(len(xs))]
            for x, m, sd in zip(offsets, mean, std):
                if m is None:
                    ax.text(x, 1.0, "n/a", ha="center", va="bottom", fontsize=7, color="0.4")
                else:
                    ax.bar(x, m, width, yerr=sd or 0.0, color=colors[i], capsize=3)
            ids = [i for r in rows for i in (r.get("run_ids") or [])]
            nan = float("nan")
            panels[metric].append(Series(text, xs, [nan if m is None else m for m in mean], std, count, ids))
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_xlim(-0.6, len(xs) - 0.4)
        ax.set_xlabel(label(axis))
        ax.set_ylabel(label(metric))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3, axis="y")
    handles = [
        Patch(color=colors[i], label=f"{s.label} (n={max(s.count, default=0)})")
        for i, s in enumerate(panels[LOCALITY_METRICS[0]])
    ]
    axes[-1].legend(handles=handles, fontsize=7)
    ids = [i for lines in panels.values() for s in lines for i in s.run_ids]
    text = caption(
        sweep_name or "?", ids, "patches holding locality.mass of the [cls] attention; mean over seeds, ±1 std"
    )
    fig.suptitle(f"Localisation of the class token's attention by {label(axis)}", fontsize=11)
    fig.text(0.0, -0.01, text, fontsize=7, va="top", ha="left", color="0.3")
    return Plotted(name, figures.save(fig, out_dir, name), text, panels)


def plot_sweep(
    sweep_url: str,
    runs: Sequence[store.StoredRun],
    table: pa.Table,
    out_dir: str,
    axis: str = "model.cls_token",
    metrics: Sequence[str] = RESULT_METRICS,
) -> list[Plotted]:
    """Every figure the sweep has data for: Figure 1 when pretrain logged curves, then each reported metric of
    each stage against each non-seed swept axis. The results table is
    `launch.runstore.results.collect(sweep_url, runs)`."""
    return plot_sweeps([(sweep_url, runs)], table, out_dir, axis, metrics)


def plot_sweeps(
    sweeps: Sweeps,
    table: pa.Table,
    out_dir: str,
    axis: str = "model.cls_token",
    metrics: Sequence[str] = RESULT_METRICS,
) -> list[Plotted]:
    """`plot_sweep` of one or more sweeps. With several, the table is theirs together with a `sweep` column of
    their URLs (`launch.views.results_view.collect_many`): Figure 1 has a line per sweep and value, and `sweep`
    is an axis of the metric figures (each metric against it, and a line per sweep against the other axes)."""
    names = sweep_names([url for url, _ in sweeps])
    sweep_name = list(names.values())
    if len(sweeps) > 1:
        table = named_sweeps(table, names)
    out = []
    with contextlib.suppress(ValueError):  # no pretrain curves: no pretrain stage, or nothing logged yet
        out.append(plot_curves_of(sweeps, out_dir, axis))
    keep, _ = aggregate.resolve_by(table, None)
    agg = aggregate.aggregate(table)
    present = [m for m in metrics if f"{m}.count" in agg.column_names]
    if any(m in present for m in LOCALITY_METRICS) and axis in keep:
        out.append(plot_locality(table, axis, out_dir, sweep_name))
    for metric in present:
        stages = [r["stage"] for r in agg.to_pylist() if r[f"{metric}.count"]]
        for stage in dict.fromkeys(stages):
            for x in keep:
                name = f"{metric}_{stage}_vs_{short(x)}"
                out.append(plot_metric(table, x, metric, out_dir, stage, sweep_name, name))
    return out
