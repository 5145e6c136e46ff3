"""`extrema-launch export`: pretrained weights from a run or any checkpoint as a timm, official or safetensors file.

Torch is imported only when the command runs (`extrema.train.weights`), so the CLI stays light.
"""

from __future__ import annotations

import argparse
import json
import typing
from typing import Any

from rich.console import Console

from extrema.spec import PRESETS, ModelSpec
from launch.addressed import OK, open_addressed
from launch.cli.arguments import RUN_HELP, run_named
from launch.inputs.errors import UsageError
from launch.runstore import store

HELP = "write pretrained weights from a run or any checkpoint as a timm, official ExtreMA or safetensors file"
DESCRIPTION = (
    "SOURCE is a sweep YAML file or run store URL with --run (the run's newest pretrain checkpoint), or without\n"
    "--run a checkpoint: a DCP step or ckpt directory, a pretrain stage or run directory, an official .pth, or one\n"
    "of our exports. The model settings come from the run's spec, else the file's own description (our exports;\n"
    "an official checkpoint's arch), else the flags (--arch, --cls-token, ...); flags that contradict the spec or\n"
    "the description are refused.\n"
    "  timm         one branch (--branch) as a timm state dict (.pth): timm's VisionTransformer for the vit and\n"
    "               avgpool designs, timm's default Cait for cait (identity talking heads, layer scale one)\n"
    "  safetensors  the same tensors in a .safetensors file, described in its metadata\n"
    "  official     the whole model, both branches, projectors and predictor, in the official release's layout\n"
    "               (the cait design only: the official code holds no other)\n"
    "Every export gets <out>.json beside it, its description: the model settings and the timm model\n"
    "(timm.create_model(**description['timm']['create_model']) builds it; extrema.train.weights.timm_model(path)\n"
    "builds and loads it). --json prints that description.\n"
    "Exit codes: 0, 2 invalid input (unknown run, no checkpoint, no model settings, a format that cannot hold the\n"
    "design, a bad --out)."
)
CLS_TOKENS = typing.get_args(ModelSpec.model_fields["cls_token"].annotation)
MODEL_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--arch", {"choices": sorted(PRESETS), "help": "the ViT preset"}),
    ("--cls-token", {"choices": CLS_TOKENS, "help": "the class-token design"}),
    ("--img-size", {"type": int, "help": "input resolution (the preset's)"}),
    ("--patch-size", {"type": int, "help": "patch size (the preset's)"}),
    ("--in-chans", {"type": int, "help": "input channels (3)"}),
    ("--class-attention-layers", {"type": int, "help": "class-attention blocks of the cait design (2)"}),
    ("--mlp-dim", {"type": int, "help": "projector and predictor width, for --format official (4096)"}),
    ("--proj-dim", {"type": int, "help": "projector and predictor output, for --format official (256)"}),
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
    p.add_argument("target", metavar="SOURCE", help="a sweep file or run store URL (with --run), or a checkpoint")
    p.add_argument("--run", help=RUN_HELP + ", when SOURCE is a sweep file or run store URL")
    p.add_argument("--stage", choices=("pretrain",), default="pretrain", help="the stage whose checkpoint (pretrain)")
    p.add_argument("--branch", choices=("ema", "student"), default="ema", help="which encoder (ema); not for official")
    p.add_argument("--format", required=True, choices=("timm", "official", "safetensors"), help="the file's layout")
    p.add_argument("--out", required=True, metavar="PATH", help="the file to write (a path or fsspec URL)")
    p.add_argument("--root", help="run store URL when FILE was swept with --root")
    p.add_argument("--json", action="store_true", help="print the export's description as JSON")
    group = p.add_argument_group("model settings, when neither a run's spec nor the file describes the model")
    for flag, kwargs in MODEL_FLAGS:
        group.add_argument(flag, **kwargs)


def source_of(args: argparse.Namespace) -> str:
    """The checkpoint URL an export reads: the run's stage directory with --run, else SOURCE itself."""
    if args.run is None:
        return str(args.target)
    addressed = open_addressed(args.target, args.root)
    run = run_named(addressed.runs, args.run, addressed.url)
    return f"{store.run_url(addressed.url, run.run_id)}/{args.stage}"


def cmd_export(args: argparse.Namespace, out: Console) -> int:
    """Export weights (the torch work happens in extrema.train.weights, imported here only)."""
    source = source_of(args)
    flags = {name: getattr(args, name) for name in (flag[2:].replace("-", "_") for flag, _ in MODEL_FLAGS)}
    from extrema.train.weights import export  # imports torch: only here

    try:
        done = export(source, args.format, args.out, args.branch, flags)
    except (ValueError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    description = {k: v for k, v in done.items() if k not in ("out", "settings_from")}
    if args.json:
        out.print(json.dumps(description, sort_keys=True), soft_wrap=True, markup=False, highlight=False)
        return OK
    wrote = f"wrote {done['out']} ({done['format']}) from {done['source']}; model settings from {done['settings_from']}"
    out.print(wrote, soft_wrap=True, markup=False, highlight=False)
    if "timm" in done:
        create = json.dumps(done["timm"]["create_model"])
        out.print(f"timm.create_model(**{create})", soft_wrap=True, markup=False, highlight=False)
    out.print(f"description: {done['out']}.json", soft_wrap=True, markup=False, highlight=False)
    return OK
