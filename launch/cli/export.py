"""`extrema-launch export`: one run's pretrained weights as a timm, official ExtreMA or safetensors file.

Torch is imported only when the command runs (`extrema.train.weights`), so the CLI stays light.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console

from launch import store
from launch.addressed import OK, open_addressed
from launch.errors import UsageError

HELP = "write one run's pretrained weights as a timm, official ExtreMA or safetensors file"
DESCRIPTION = (
    "Reads the newest complete checkpoint of the run's pretrain stage.\n"
    "  timm         one branch (--branch) as a timm state dict (.pth): timm's VisionTransformer for the vit and\n"
    "               avgpool designs, timm's Cait for cait (layer scale one in its self-attention blocks)\n"
    "  safetensors  the same tensors in a .safetensors file, with the timm model's config in its metadata\n"
    "  official     the whole model, both branches, projectors and predictor, in the official release's layout\n"
    "The timm model's constructor arguments are printed (extrema.train.weights.build_timm builds it).\n"
    "Exit codes: 0, 2 invalid input (unknown run, no checkpoint yet, a bad --out)."
)


def add_parser(subparsers: Any) -> None:
    """Register the `export` command on the CLI's subparsers."""
    p = subparsers.add_parser(
        "export",
        help=HELP,
        description=f"{HELP}.\n\n{DESCRIPTION}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(fn=cmd_export)
    p.add_argument("target", metavar="FILE|URL", help="a sweep YAML file, or the <root>/<sweep> URL of a run store")
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--stage", choices=("pretrain",), default="pretrain", help="the stage whose checkpoint (pretrain)")
    p.add_argument("--branch", choices=("ema", "student"), default="ema", help="which encoder (ema); not for official")
    p.add_argument("--format", required=True, choices=("timm", "official", "safetensors"), help="the file's layout")
    p.add_argument("--out", required=True, metavar="PATH", help="the file to write (a path or fsspec URL)")
    p.add_argument("--root", help="run store URL when FILE was swept with --root")


def cmd_export(args: argparse.Namespace, out: Console) -> int:
    """Export one run's weights (the torch work happens in extrema.train.weights, imported here only)."""
    addressed = open_addressed(args.target, args.root)
    run = next((r for r in addressed.runs if r.run_id == args.run), None)
    if run is None:
        raise UsageError(f"run {args.run!r} is not part of {addressed.url}")
    from extrema.train.weights import export_run  # imports torch: only here

    try:
        done = export_run(store.run_url(addressed.url, run.run_id), args.branch, args.format, args.out, args.stage)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    out.print(f"wrote {done['out']} ({done['format']}) from {done['source']}")
    if "timm_config" in done:
        out.print(f"timm model: {json.dumps(done['timm_config'])}", soft_wrap=True, markup=False, highlight=False)
    return OK
