"""`extrema-launch status`: one table of every run and stage, the backends asked; --watch refreshes it."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from launch.addressed import DAMAGED, OK, is_sweep_file, open_addressed, print_notes, print_unreadable
from launch.cli.arguments import add_command, add_target, positive
from launch.inputs.errors import UsageError
from launch.runstore import listing, store
from launch.sweepfile import overrides
from launch.sweepfile.expand import load_sweep
from launch.views import tables
from launch.views.status_view import show_status, status_code, status_table, watch_status

HELP = "one table of every run and stage with state, attempts, elapsed, latest metric"
MORE = (
    "Stages the run store shows in flight are checked with their backend (squeue/sacct, the Ray job API, the\n"
    "PID of a local sweep); one whose job ended or vanished is recorded failed or cancelled.\n"
    "--watch refreshes the table until every stage has ended (completed, failed or cancelled; stages not\n"
    "submitted yet keep it waiting); Ctrl-C stops watching.\n"
    "Completed stages are read from the sweep's ledger (a few files) once a reader has seen them; --fresh reads\n"
    "every stage's own records and sets the ledger right (after a stage directory was removed by hand).\n"
    "Exit codes: 0, 1 when a stage failed, 2 invalid input, 3 an unreadable record (listed), 130 interrupted."
)


def add_parser(sub: Any) -> None:
    """Register `status` on the CLI's subparsers."""
    p = add_command(sub, "status", cmd_status, HELP, MORE)
    add_target(p)
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="the overrides FILE was swept with (default: those its last submission recorded in the manifest)",
    )
    p.add_argument("--watch", action="store_true", help="refresh the table until every stage has ended")
    p.add_argument("--interval", type=positive, default=5.0, metavar="S", help="seconds between refreshes (5)")
    p.add_argument(
        "--fresh", action="store_true", help="read every stage's own records, not the ledger of completed stages"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="the table as a JSON list of records (one per run and stage; the store's sweeps for a root) on standard "
        "output, nothing else there",
    )


def recorded_overrides(target: str, root: str | None) -> list[str]:
    """The `key=value` overrides the last submission of a sweep file recorded in its manifest's source (none for a
    URL, a sweep never submitted, or one last submitted from another file)."""
    if not is_sweep_file(target):
        return []
    sweep, _ = load_sweep(target, root=root)
    try:
        manifest = store.read_manifest(store.sweep_url(sweep.root, sweep.name))
    except (store.Unreadable, ValueError, OSError):
        return []
    return overrides.recorded((manifest or {}).get("source"), str(Path(target).resolve())) or []


def cmd_status(args: argparse.Namespace, out: Console) -> int:
    """One table of every run and stage: state, attempts, elapsed time, latest metric; backends asked. For a root that
    holds sweeps rather than one, a table of its sweeps."""
    if args.watch and args.json:
        raise UsageError("--json prints the table once; leave out --watch")
    if not is_sweep_file(args.target):
        listed = listed_sweeps(args.target)
        if listed is not None:
            return show_sweeps(out, args.target, listed, args.json)
    given = args.overrides or recorded_overrides(args.target, args.root)
    if given and not args.overrides:
        out.print(Text(f"with the overrides of its last submission: {shlex.join(given)}", style="dim"))
    target = open_addressed(args.target, args.root, given)
    if target.manifest is None and not target.problems and never_run(target.url, target.runs):
        raise UsageError(
            f"{args.target}: never swept to {target.url} (no {store.MANIFEST} there); `extrema-launch sweep` submits it"
        )
    if args.watch:
        return watch_status(target, out, args.interval)
    view = status_table(target, fresh=args.fresh)
    if args.json:
        sys.stdout.write(json.dumps(view.records(), indent=1) + "\n")
        print_notes(out, view.seen)
        print_unreadable(out, view.problems)
    else:
        show_status(out, target.url, view)
    return status_code(view)


def never_run(url: str, runs: list[store.StoredRun]) -> bool:
    """Whether no stage of the runs has a record in the store (and no submission wrote a manifest: the caller's)."""
    return not any(store.read_statuses(url, [k for r in runs for k in r.job_keys()]).values())


def listed_sweeps(target: str) -> list[dict[str, Any]] | None:
    """The sweeps below a URL that is a run-store root (no manifest of its own, sweeps with one below); else None."""
    try:
        url = store.normalize_root(target)
        if store.has_manifest(url):
            return None
    except (ValueError, store.Unreadable):
        return None
    return listing.sweeps_in(url) or None


def show_sweeps(out: Console, root: str, sweeps: list[dict[str, Any]], as_json: bool) -> int:
    """The sweeps of a run-store root: name, runs, jobs and their states (JSON records with --json); exit 3 when a
    manifest is unreadable, else 0."""
    if as_json:
        sys.stdout.write(json.dumps(sweeps, indent=1) + "\n")
    else:
        rows = [
            (
                s["sweep"],
                str(s.get("runs", "-")),
                str(s.get("jobs", "-")),
                s.get("unreadable") or listing.summary(s["states"]),
            )
            for s in sweeps
        ]
        tables.show(out, f"{len(sweeps)} sweep(s) in {root}", ("sweep", "runs", "jobs", "states"), rows)
        out.print(Text("extrema-launch status <root>/<sweep> shows one of them", style="dim"))
    return DAMAGED if any("unreadable" in s for s in sweeps) else OK
