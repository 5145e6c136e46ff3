"""`extrema-launch check`: will it fit? Each configuration of every stage of a sweep stepped once under fake tensors
at its world size (`python -m extrema.check`, one process for all): memory per GPU, FLOPs, time and GPU-hours; a
configuration that does not fit the GPU named in launcher.resources is refused. `sweep` runs the same check before
it submits when the resources name a gpu_type or gpu_memory_gb (or with --check; --no-check skips it)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.text import Text

from launch.addressed import OK, USAGE
from launch.cli.arguments import add_command, add_sweep_file
from launch.estimates import Options, configurations, estimate_all, wanted
from launch.inputs.errors import UsageError
from launch.sweepfile.expand import load_runs
from launch.sweepfile.model import LauncherSpec, Run
from launch.views import check_view

LOCAL_ROOT = "runs"  # a root every backend accepts (nothing is read or written there)
HELP = "predict each stage configuration's memory per GPU, FLOPs and GPU-hours; refuse what does not fit"
MORE = (
    "Each distinct configuration of every stage of the sweep (runs differing only in the stage's seed share one)\n"
    "is built as the stage builds it, wrapped at the stage's world size (its launcher.resources nodes x\n"
    "processes_per_node) in a fake process group and stepped once under fake tensors (knn: a forward pass, its\n"
    "feature bank and the search of its queries; detect: at the largest padded batch, 100 objects per COCO image\n"
    "and the RPN's and RoI samplers' caps; inpaint: the decoder's step and an evaluation batch; locality: one\n"
    "batch's attention): nothing is allocated, no GPU is needed, torch is. launcher.resources.gpu_type (H100,\n"
    "H200, A100-40GB, A100-80GB, V100, L40S) gives the peak FLOP/s and the memory; gpu_memory_gb overrides the\n"
    "memory. A configuration whose predicted peak per GPU passes 90% of it is refused with one line. Whether the\n"
    "backend can use the file's root (a shared folder for Slurm's logs) is left to sweep: nothing is read or\n"
    "written there.\n"
    "Exit codes: 0 every configuration fits (or no limit was given), 2 one does not or cannot be estimated, or\n"
    "the file is invalid."
)


def add_options(p: argparse.ArgumentParser) -> None:
    """What the estimate assumes: the utilisation of peak FLOP/s and the training images of an epoch."""
    p.add_argument("--utilization", type=float, help="share of the GPU's peak bf16 FLOP/s a step reaches (default 0.4)")
    p.add_argument(
        "--train-images",
        type=int,
        metavar="N",
        help="training images of an epoch (default: the dataset's; ImageNet-1k's 1,281,167 for folders and shards)",
    )


def add_parser(sub: Any) -> None:
    """Register `check` on the CLI's subparsers."""
    p = add_command(sub, "check", cmd_check, HELP, MORE)
    add_sweep_file(p, "set a field of the file, as sweep does (launcher.resources.gpu_type=H100)")
    add_options(p)
    p.add_argument("--json", action="store_true", help="the estimates as JSON on standard output")


def options_of(args: argparse.Namespace) -> Options:
    """The estimate's options from the command line (the defaults where not given); UsageError when unusable."""
    utilization, images = args.utilization, args.train_images
    if utilization is not None and not 0 < utilization <= 1:
        raise UsageError(f"--utilization {utilization} must lie in (0, 1]")
    if images is not None and images < 1:
        raise UsageError(f"--train-images {images} must be at least 1")
    return Options(Options().utilization if utilization is None else utilization, images)


def run_check(out: Console, name: str, runs: Sequence[Run], launcher: LauncherSpec, options: Options) -> list[str]:
    """Estimate every stage configuration, show the table; the refusal lines (empty when all fit)."""
    configs = configurations(runs, launcher)
    if not configs:
        out.print(Text(f"check {name}: no run, no stage to estimate", style="dim"))
        return []
    start = time.monotonic()
    estimates = estimate_all(configs, options)
    seconds = time.monotonic() - start
    title = f"check {name}: {len(configs)} stage configuration{'s' if len(configs) > 1 else ''} ({seconds:.0f} s)"
    check_view.show(out, title, estimates, options)
    return [e.refusal for e in estimates if e.refusal]


def refuse(lines: Sequence[str], then: str) -> int:
    """Print one line per refused configuration on standard error; the usage exit code."""
    for line in lines:
        print(f"extrema-launch: refused: {line}", file=sys.stderr, flush=True)
    print(f"extrema-launch: {then}", file=sys.stderr, flush=True)
    return USAGE


def cmd_check(args: argparse.Namespace, out: Console) -> int:
    """Estimate, show, and refuse what does not fit."""
    options = options_of(args)
    # validated with the run store at a local path: whether the backend can reach the file's root is sweep's to check
    sweep, runs = load_runs(args.file, root=LOCAL_ROOT, overrides=args.overrides)
    if args.json:
        estimates = estimate_all(configurations(runs, sweep.launcher), options)
        sys.stdout.write(json.dumps(check_view.records(estimates), indent=1) + "\n")
        refused = [e.refusal for e in estimates if e.refusal]
    else:
        refused = run_check(out, sweep.name, runs, sweep.launcher, options)
    return refuse(refused, "nothing submitted") if refused else OK


def before_submit(
    args: argparse.Namespace, out: Console, name: str, runs: Sequence[Run], launcher: LauncherSpec
) -> int:
    """`sweep`'s check: run when asked (--check) or when the resources name a GPU type or memory, unless
    --no-check; USAGE after one line per refused configuration, else OK."""
    if args.check is False or not (args.check or wanted(launcher)):
        return OK
    refused = run_check(out, name, runs, launcher, options_of(args))
    if refused:
        return refuse(refused, "nothing submitted (sweep --no-check submits without the check)")
    return OK
