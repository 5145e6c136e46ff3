"""`extrema-launch cancel`: stop the pending, running and preempted stages of a sweep (or of one run) and record
them cancelled; `sweep` resumes them later."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.text import Text

from extrema.run import contract, lease
from extrema.run.contract import StageState
from launch.addressed import DAMAGED, FAILED, OK, open_addressed, print_unreadable
from launch.backends.base import in_flight_groups, make_backend, recorded_class
from launch.cli.arguments import add_command, add_target, run_named
from launch.runstore import store

HELP = "cancel pending, running and preempted stages of a sweep (or of one run)"
MORE = (
    "Asks each stage's backend to stop its job (scancel, Ray stop_job; a local sweep stops the stage at its\n"
    "next poll) and records the stage cancelled; `sweep` resumes it later.\n"
    "Exit codes: 0, 1 when a backend could not be asked (those stages are left as they are), 2 invalid input."
)


def add_parser(sub: Any) -> None:
    """Register `cancel` on the CLI's subparsers."""
    p = add_command(sub, "cancel", cmd_cancel, HELP, MORE)
    add_target(p, run="only")


def cmd_cancel(args: argparse.Namespace, out: Console) -> int:
    """Cancel the pending, running and preempted stages of a sweep (or of one run) and record them cancelled; a
    local attempt is signalled only when its process is proven to be the stage's (else: "not stopped: <why>")."""
    target = open_addressed(args.target, args.root)
    runs = target.runs
    if args.run:
        runs = [run_named(runs, args.run, target.url)]
    keys = [k for r in runs for k in r.job_keys()]
    statuses = store.read_statuses(target.url, keys)
    stages = {k: store.stage_url(target.url, *store.split_key(k)) for k in keys}
    holders = {k: h for k in keys if not statuses[k].get(store.UNREADABLE) and (h := lease.live_holder(stages[k]))}
    live = [k for k in keys if statuses[k].get("state") in contract.IN_FLIGHT or k in holders]
    kept: list[str] = []
    for (name, address), ids in in_flight_groups({k: statuses[k] for k in live}, target.launcher).items():
        try:
            make_backend(name, target.launcher, address).cancel(list(ids.values()))
        except Exception as e:
            kept += list(ids)
            out.print(Text(f"could not cancel {len(ids)} {name} job(s): {type(e).__name__}: {e}", style="red"))
    for k, why in stop_attempts(target.url, {k: h for k, h in holders.items() if k not in kept}, statuses).items():
        kept.append(k)
        out.print(Text(f"{k}: not stopped: {why}", style="red"), soft_wrap=True)
    done = [k for k in live if k not in kept]
    unrecorded = 0
    held: list[str] = []
    for k in done:
        try:
            if store.record_ended(stages[k], StageState.CANCELLED, "cancelled by user") is None:
                held += [k] if lease.live_holder(stages[k]) is not None else []
        except OSError as e:  # a read-only store: the job is stopped, the record cannot say so
            unrecorded += 1
            out.print(Text(f"{k}: stopped, not recorded: {contract.os_reason(e)}", style="yellow"), soft_wrap=True)
    out.print(f"cancelled {len(done)} stage job(s)" + (f": {', '.join(done)}" if done else ""))
    if held:  # not ended yet, or killed before it could say so: nobody may record over a live lease
        out.print(
            Text(
                f"{', '.join(held)}: the job was told to stop, but its attempt still holds the stage's lease; `status` "
                f"shows the attempt until it ends or its lease lapses (at most {lease.ttl_s():g} s after its last "
                "heartbeat), then records it cancelled",
                style="yellow",
            ),
            soft_wrap=True,
        )
    print_unreadable(out, store.unreadable(statuses))
    return FAILED if kept or unrecorded else DAMAGED if store.unreadable(statuses) else OK


def stop_attempts(
    sweep_url: str, holders: Mapping[str, lease.Holder], statuses: Mapping[str, Mapping[str, Any]]
) -> dict[str, str]:
    """Stop the attempts that run as processes of this machine, each through the backend its stage records; key ->
    why one was not stopped."""
    by_backend: dict[str, dict[str, lease.Holder]] = {}
    for key, holder in holders.items():
        by_backend.setdefault(str(statuses[key].get("backend")), {})[key] = holder
    kept: dict[str, str] = {}
    for name, group in by_backend.items():
        # A stage whose status names no known backend (a record an attempt wrote before its status, or a hostile
        # one): the local backend's proof decides (host, start time, command line), so nothing is reported
        # cancelled that was not stopped.
        cls = recorded_class(name) or recorded_class("local")
        assert cls is not None
        kept.update(cls.stop_attempts(sweep_url, group))
    return kept
