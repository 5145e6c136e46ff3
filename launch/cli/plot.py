"""`extrema-launch plot`: the figures of a sweep, or of several together (training curves, metrics against swept
axes), as PNG and SVG."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from launch.addressed import FAILED, OK, open_addressed, print_notes, print_unreadable
from launch.cli.arguments import add_command, add_target
from launch.inputs.errors import UsageError
from launch.views import aggregate, plots, tables
from launch.views.results_view import collect, collect_many

HELP = "draw the sweep's figures as PNG and SVG"
MORE = (
    "Figure 1: training loss and kNN accuracy against epoch from the pretrain logs, one line per value of\n"
    "--axis (default model.cls_token when swept), mean and a band of one std over seeds. Then every plotted\n"
    "metric a stage reports (kNN, probe, finetune, inpainting) against each swept axis, error bars over seeds.\n"
    "Each caption names the sweep and its run ids. --out is a directory or fsspec URL.\n"
    "Several sweeps (FILE|URL ...) draw together: the sweep is an axis of the metric figures (each metric against\n"
    "it, a line per sweep against the others), Figure 1 has a line per sweep and value, and each sweep is named by\n"
    "the shortest end of its URL no other shares (a run as <sweep>/<run id>). A sweep given twice is refused.\n"
    "Exit codes: 0, 1 when there is nothing to plot yet, 2 invalid input."
)


def add_parser(sub: Any) -> None:
    """Register `plot` on the CLI's subparsers."""
    p = add_command(sub, "plot", cmd_plot, HELP, MORE)
    add_target(p, many=True)
    p.add_argument("--out", required=True, metavar="DIR", help="directory or URL for the figures")
    p.add_argument("--axis", help="the axis of Figure 1's lines (default: model.cls_token when swept)")


def cmd_plot(args: argparse.Namespace, out: Console) -> int:
    """The figures of the sweeps (training curves, metrics against swept axes) as PNG and SVG in --out."""
    targets = [open_addressed(t, args.root) for t in args.target]
    if len(targets) > 1:
        table, seen, problems = collect_many(targets)
    else:
        table, one, problems = collect(targets[0])
        seen = [one]
    axes, _ = aggregate.resolve_by(table, None)
    if args.axis is not None and args.axis not in axes:
        raise UsageError(f"--axis {args.axis} is not a swept axis (swept, seeds aside: {', '.join(axes) or 'none'})")
    axis = args.axis or next((a for a in ("model.cls_token", *axes) if a in axes), "model.cls_token")
    try:
        figures = plots.plot_sweeps([(t.url, t.runs) for t in targets], table, args.out, axis=axis)
    except ImportError as e:
        raise UsageError(f"plot needs matplotlib (pip install 'extrema-ssl[plot]'): {e}") from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"cannot write to --out {args.out}: {type(e).__name__}: {e}") from None
    for reconciled in seen:
        print_notes(out, reconciled)
    print_unreadable(out, problems)
    if not figures:
        out.print("nothing to plot yet: no pretrain curves and no completed stage that reports a plotted metric")
        return FAILED
    rows = [(f.name, "\n".join(f.files)) for f in figures]
    tables.show(out, f"{len(figures)} figures of {', '.join(t.url for t in targets)}", ("figure", "files"), rows)
    return OK
