"""`extrema-launch logs`: print the logs of one stage of one run; with --follow until the stage ends."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from rich.console import Console
from rich.text import Text

from extrema.run import contract
from extrema.run.contract import StageState
from launch import logs
from launch.addressed import FAILED, OK, open_addressed
from launch.cli.arguments import add_command, add_target, run_named
from launch.inputs.errors import UsageError
from launch.reconcile import reconcile
from launch.runstore import store
from launch.sweepfile.model import STAGE_ORDER

HELP = "print the logs of one stage of one run"
MORE = (
    "The stage's logs/ files (local backend, kept Ray logs), its Slurm job's submitit .out/.err files, or its\n"
    "Ray job's log. --follow keeps printing until the stage ends (asking its backend).\n"
    "Exit codes: 0, 1 when a followed stage failed, 2 invalid input."
)


def add_parser(sub: Any) -> None:
    """Register `logs` on the CLI's subparsers."""
    p = add_command(sub, "logs", cmd_logs, HELP, MORE)
    add_target(p, run="required")
    p.add_argument("--stage", required=True, choices=STAGE_ORDER, help="stage")
    p.add_argument("--follow", action="store_true", help="keep printing until the stage ends")


def cmd_logs(args: argparse.Namespace, out: Console) -> int:
    """Print a stage's logs (local files, Slurm job files, Ray job log); with --follow until the stage ends."""
    target = open_addressed(args.target, args.root)
    run = run_named(target.runs, args.run, target.url)
    args.run = run.run_id
    if args.stage not in run.stages:
        raise UsageError(f"run {args.run} has no stage {args.stage!r} (its stages: {', '.join(run.stages)})")
    key = store.job_key(args.run, args.stage)
    stage_dir = store.stage_url(target.url, args.run, args.stage)
    tail = logs.Tail(stage_dir)
    try:
        while True:
            status = store.read_status(stage_dir)
            state = status.get("state")
            if args.follow:
                state = reconcile(target.url, {key: status}, target.launcher, target.manifest, write=True).states[key]
            ranks = logs.stage_ranks(stage_dir)
            sources = logs.sources(stage_dir, status, target.manifest, target.launcher, ranks)
            for part in tail.read(sources, ranks, final=not args.follow):
                if part.kind == "heading":
                    out.print(Text(part.text, style="bold"), soft_wrap=True)
                elif part.kind == "problem":
                    out.print(Text(part.text, style="yellow"))
                else:
                    sys.stdout.write(part.text)
                    sys.stdout.flush()
            if not args.follow or state not in contract.IN_FLIGHT:
                sys.stdout.write(tail.rest())
                if not tail.any_read():
                    out.print(f"no logs yet for {key} ({state or 'not submitted'})")
                return FAILED if args.follow and state == StageState.FAILED else OK
            time.sleep(1.0)
    except KeyboardInterrupt:
        return OK
