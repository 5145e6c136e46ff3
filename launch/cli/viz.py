"""`extrema-launch viz attention`: Figure 3 of one run, last-layer attention maps of chosen queries."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console

from launch.addressed import OK, open_addressed
from launch.cli.arguments import add_command, add_target, run_named
from launch.inputs.errors import UsageError
from launch.runstore import store

ATTENTION = (
    "Last-layer attention maps of one run (Figure 3), mean over heads, overlaid on the inputs.\n\n"
    "Rows are images of the run's dataset, columns the queries: cls (the instance token; not in the avgpool\n"
    "design) and patch indices (row-major). The encoder comes from the run's pretrain export, else its newest\n"
    "checkpoint. Writes attention.png and attention.svg to --out (default <run>/viz).\n"
    "Exit codes: 0, 2 invalid input (unknown run, no checkpoint yet, an image or patch out of range)."
)


def add_parser(sub: Any) -> None:
    """Register `viz` and its figures on the CLI's subparsers."""
    p = add_command(
        sub, "viz", None, "figures of one run", "viz attention: last-layer attention maps of chosen queries (Figure 3)."
    )
    figure = p.add_subparsers(dest="figure", required=True, metavar="FIGURE")
    p = add_command(
        figure, "attention", cmd_viz_attention, "last-layer attention maps of one run (Figure 3)", description=ATTENTION
    )
    add_target(p, run="required")
    p.add_argument("--images", nargs="+", type=int, default=[0, 1, 2, 3], metavar="I", help="image indices (0 1 2 3)")
    p.add_argument("--queries", nargs="+", type=query, metavar="Q", help="cls and/or patch indices (default: cls and "
                   "three patches on the diagonal)")  # fmt: skip
    p.add_argument("--branch", choices=("ema", "student"), default="ema", help="which encoder (ema)")
    p.add_argument("--split", choices=("val", "train"), default="val", help="which split's images (val)")
    p.add_argument("--out", metavar="DIR", help="directory or URL for the figure (default: <run>/viz)")


def query(text: str) -> str | int:
    """A --queries item: `cls` (the instance token) or a patch index."""
    if text == "cls":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither cls nor a patch index") from None


def cmd_viz_attention(args: argparse.Namespace, out: Console) -> int:
    """Figure 3 of one run: last-layer attention maps of chosen queries over chosen images."""
    target = open_addressed(args.target, args.root)
    run = run_named(target.runs, args.run, target.url)
    if "pretrain" not in run.stages:
        raise UsageError(f"run {args.run} has no pretrain stage (its stages: {', '.join(run.stages)})")
    from extrema.viz.attention import render_attention  # imports torch: only here

    try:
        figure = render_attention(
            store.run_url(target.url, run.run_id),
            out_dir=args.out,
            images=tuple(args.images),
            queries=args.queries,
            branch=args.branch,
            split=args.split,
        )
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    out.print(f"wrote {', '.join(figure.files)}")
    return OK
