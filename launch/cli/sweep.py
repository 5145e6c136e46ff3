"""`extrema-launch sweep`: validate a sweep file, print the plan and submit what is not done or in flight."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from extrema.run.contract import StageState, os_reason
from launch.addressed import DAMAGED, FAILED, OK, USAGE, held_run_ids, print_notes, print_unreadable, swept_axes
from launch.backends.base import BACKENDS, backend_class
from launch.cli import check
from launch.cli.arguments import add_command, add_sweep_file, positive
from launch.inputs.errors import UsageError
from launch.pipeline import Decision, plan, select
from launch.progress import Watch
from launch.reconcile import reconcile
from launch.runstore import ledger, results, roots, store
from launch.runstore import snapshot as snapshots
from launch.submit import Submission, submit
from launch.sweepfile import overrides
from launch.sweepfile.earlier_ids import under_earlier_ids
from launch.sweepfile.expand import load_runs
from launch.sweepfile.model import LauncherSpec
from launch.views import plan_view, tables
from launch.views.tables import cell

HELP = "validate a sweep file, print the plan and submit what is not done"
MORE = (
    "Completed and in-flight stages are never submitted again; cancelled and vanished ones are resumed; failed\n"
    "ones only with --retry-failed. local: runs here, with progress, until every stage ends (Ctrl-C stops\n"
    "them, resumably). slurm: job arrays through submitit; returns once submitted. ray: Ray jobs to\n"
    "launcher.ray_address, else RAY_ADDRESS; returns once submitted. With neither set, a private local Ray\n"
    "head is started for the sweep (explicit free ports, its own HOME and temp dir), the sweep shows progress\n"
    "until the stages end, keeps each job's log in <stage>/logs/ and stops that head by its PID.\n"
    "Exit codes: 0 submitted (or all done), 1 a stage failed or the submission failed, 2 invalid input\n"
    "(nothing submitted, nothing written), 3 an unreadable record (listed; the rest submitted), 130 interrupted."
)


def add_parser(sub: Any) -> None:
    """Register `sweep` on the CLI's subparsers."""
    p = add_command(sub, "sweep", cmd_sweep, HELP, MORE)
    add_sweep_file(
        p,
        "set a field of the file: a dotted path into base (pretrain.base_lr=1e-3) or launcher "
        "(launcher.resources.nodes=2), the value read as YAML; validated like the file",
    )
    p.add_argument("--backend", choices=sorted(BACKENDS), help="override launcher.backend")
    p.add_argument("--root", help="override root: the run store URL (default ./runs)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; submit and write nothing")
    p.add_argument(
        "--show-scripts",
        action="store_true",
        help="with --dry-run on slurm: print each sbatch script as it would be submitted (no cluster asked)",
    )
    p.add_argument(
        "--json", action="store_true", help="with --dry-run: the plan as JSON on standard output (nothing else there)"
    )
    p.add_argument("--retry-failed", action="store_true", help="resubmit failed stages too")
    p.add_argument(
        "--snapshot",
        choices=("on", "off"),
        help="run the code as it is now, stored in the run store (on; default: launcher.snapshot, true), or "
        "whatever is installed when each job starts (off)",
    )
    shown = p.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true", help="while stages run here, print only the stages that end")
    shown.add_argument(
        "--json-events",
        action="store_true",
        help="while stages run here, print one JSON object per event (state changes, progress) on standard output; "
        "everything else goes to standard error",
    )
    p.add_argument(
        "--progress-every",
        type=positive,
        default=30.0,
        metavar="S",
        help="without a terminal: seconds between the progress lines of a running stage (30)",
    )
    checked = p.add_mutually_exclusive_group()
    checked.add_argument(
        "--check",
        action="store_true",
        default=None,
        help="predict each stage configuration's memory per GPU and time first, and refuse what does not fit "
        "(extrema-launch check; on by default when launcher.resources names gpu_type or gpu_memory_gb)",
    )
    checked.add_argument("--no-check", dest="check", action="store_false", help="submit without the check")
    check.add_options(p)
    p.add_argument(
        "--allow-code-change",
        action="store_true",
        help="let stages resume checkpoints written by other code (recorded in their provenance)",
    )


def show_plan(out: Console, title: str, decisions: Sequence[Decision], runs: Sequence[store.StoredRun]) -> None:
    """The plan: one row per job with its swept values, its state and what this submission does with it."""
    by_id = {r.run_id: results.flatten(r.overrides) for r in runs}
    paths = swept_axes(runs)
    columns = ("run", "stage", *paths, "state", "action")
    rows, styles, pairs = [], [], []
    for d in decisions:
        run_id, stage = d.job.key.split("/", 1)
        action = f"submit ({d.reason})" if d.submit else d.reason
        rows.append((run_id, stage, *(cell(by_id[run_id].get(p)) for p in paths), cell(d.state), action))
        styles.append({"action": "bold" if d.submit else "dim"})
        pairs.append((stage, action.split(" (", 1)[0] if d.submit else (d.state or "not submitted")))
    tables.show(out, title, columns, rows, styles, pairs)


def unvouch(url: str, statuses: dict[str, dict[str, Any]]) -> None:
    """Revoke what the ledger holds of stages whose own status is no longer completed (a stage directory removed
    to run it again), so that `status` never shows them completed from the ledger while they run anew."""
    held = ledger.read(url, store.real_tree(url))
    stale = [k for k, s in statuses.items() if k in held and s.get("state") != StageState.COMPLETED]
    if stale:
        ledger.append(url, {}, revoked=stale)


def cmd_sweep(args: argparse.Namespace, out: Console) -> int:
    """Validate, expand, plan, print the plan and submit what is not done or in flight."""
    if (args.json or args.show_scripts) and not args.dry_run:
        raise UsageError("--json and --show-scripts show the plan of a --dry-run: add --dry-run")
    sweep, runs = load_runs(args.file, backend=args.backend, root=args.root, overrides=args.overrides)
    url = store.sweep_url(sweep.root, sweep.name)
    launcher = sweep.launcher
    if args.show_scripts and launcher.backend != "slurm":
        raise UsageError(f"--show-scripts shows sbatch scripts; the backend is {launcher.backend} (--backend slurm)")
    if url.startswith("memory://") and not args.dry_run:
        raise UsageError("root memory:// lives in this process only; the stages run in other processes")
    if check.before_submit(args, out, sweep.name, runs, launcher) != OK:
        return USAGE
    roots.check_usable(url, write=not args.dry_run)
    damage: list[str] = []
    try:
        old_manifest = store.read_manifest(url)
    except store.Unreadable as e:
        old_manifest, damage = None, [f"{e} (kept beside as {store.MANIFEST}.damaged-<time>)"]
    runs = under_earlier_ids(runs, held_run_ids(old_manifest))
    jobs = plan(runs, launcher, url)
    statuses = store.read_statuses(url, [j.key for j in jobs])
    problems = [*store.unreadable(statuses), *damage]
    seen = reconcile(url, statuses, launcher, old_manifest, write=not args.dry_run)
    if not args.dry_run:
        unvouch(url, statuses)
    kind = backend_class(launcher.backend)
    adopt = {k for k in (*seen.holders, *seen.elsewhere) if kind.adopts_running}
    decisions = select(jobs, seen.states, args.retry_failed, stuck=seen.stuck, adopt=adopt)
    listed = [r.stored() for r in runs]
    todo = [d.job for d in decisions if d.submit]
    if not args.json:
        show_plan(out, f"sweep {sweep.name}: {len(runs)} runs, {len(jobs)} jobs -> {url}", decisions, listed)
    if args.dry_run and not args.json:
        plan_view.show_shapes(out, plan_view.shapes(decisions))
    print_notes(out, seen)
    print_unreadable(out, problems)
    private = kind.private_cluster(launcher)
    where = launcher.backend + (f" ({private.what})" if private else "")
    use_snapshot = launcher.snapshot if args.snapshot is None else args.snapshot == "on"
    snapshot = take_snapshot(use_snapshot, out) if todo else None
    if args.dry_run:
        return dry_run(args, out, PlannedSweep(sweep.name, url, launcher, where, decisions, listed), snapshot)
    held_back = FAILED if any(d.state == StageState.FAILED and not d.submit for d in decisions) else OK
    held_back = DAMAGED if problems else held_back
    log_dir = kind.log_dir(launcher, url)
    source = overrides.source(str(Path(args.file).resolve()), args.overrides)
    manifest = store.sweep_manifest(sweep.name, sweep.root, source, launcher.model_dump(mode="json"), log_dir, listed)
    if not todo:
        store.write_manifest(url, manifest)
        out.print("nothing to submit: every job is completed, in flight, failed or waiting (see the action column)")
        return held_back
    by_run = {r.run_id: r for r in runs}
    specs = {
        j.key: by_run[store.split_key(j.key)[0]].spec(sweep.name, j.stage).model_copy(update={"logging": sweep.logging})
        for j in todo
    }
    previous = {j.key: statuses[j.key] for j in todo}
    code_id = None
    if snapshot is not None:
        try:
            code_id, code_dir = store_snapshot(snapshot, url, launcher, log_dir)
        except OSError as e:  # a full or unwritable store: nothing was submitted, nothing is left pending
            out.print(Text(f"cannot save the code snapshot in {url}: {os_reason(e)}; nothing submitted", style="red"))
            return FAILED
        manifest["code"] = {"id": code_id, "git_sha": snapshot.git_sha, "changed": list(snapshot.changed)}
        todo = [replace(j, code_dir=code_dir, allow_code_change=args.allow_code_change) for j in todo]
    elif args.allow_code_change:
        todo = [replace(j, allow_code_change=True) for j in todo]
    watch = Watch("json" if args.json_events else "quiet" if args.quiet else "auto", args.progress_every)
    code = submit(Submission(url, todo, specs, manifest, log_dir, previous, code_id), launcher, out, watch)
    return code if code != OK else held_back


@dataclass(frozen=True)
class PlannedSweep:
    """What a dry run shows: the sweep, its store URL, launcher and backend (as the plan names it), the plan."""

    name: str
    url: str
    launcher: LauncherSpec
    where: str
    decisions: Sequence[Decision]
    runs: Sequence[store.StoredRun]


def dry_run(args: argparse.Namespace, out: Console, planned: PlannedSweep, snapshot: snapshots.Snapshot | None) -> int:
    """Show what a submission would do: the plan as JSON (--json), the sbatch scripts (--show-scripts); exit 0."""
    launcher, url = planned.launcher, planned.url
    todo = [d.job for d in planned.decisions if d.submit]
    scripts: list[dict[str, Any]] = []
    if args.show_scripts and todo:
        log_dir = backend_class(launcher.backend).log_dir(launcher, url)
        code_dir = None if snapshot is None else plan_view.planned_code_dir(snapshot.id, url, launcher, log_dir)
        try:
            scripts = plan_view.sbatch_scripts([replace(j, code_dir=code_dir) for j in todo], launcher, log_dir)
        except ValueError as e:
            raise UsageError(f"cannot render the sbatch scripts: {e}") from None
    if args.json:
        plan = plan_view.plan_json(planned.name, url, planned.where, planned.decisions, planned.runs)
        sys.stdout.write(json.dumps({**plan, **({"scripts": scripts} if args.show_scripts else {})}, indent=1) + "\n")
    elif scripts:
        plan_view.show_scripts(out, scripts)
    out.print(f"dry run: would submit {len(todo)} of {len(planned.decisions)} jobs to {planned.where}; nothing written")
    return OK


def take_snapshot(use: bool, out: Console) -> snapshots.Snapshot | None:
    """The code snapshot of this submission (None when switched off), with a warning naming uncommitted changes."""
    if not use:
        out.print("code snapshot off: jobs import the project from wherever it is installed when they start")
        return None
    try:
        snap = snapshots.take()
    except (snapshots.SnapshotError, OSError) as e:
        raise UsageError(f"cannot snapshot the code ({e}); `--snapshot off` runs without one") from None
    if snap.changed:
        shown = ", ".join(snap.changed[:10]) + (f" and {len(snap.changed) - 10} more" if len(snap.changed) > 10 else "")
        out.print(Text(f"warning: uncommitted changes go into the code snapshot: {shown}", style="yellow"))
    out.print(f"code snapshot {snap.id} ({len(snap.files)} files, git {(snap.git_sha or 'none')[:12]})")
    return snap


def store_snapshot(snap: snapshots.Snapshot, url: str, launcher: LauncherSpec, log_dir: str) -> tuple[str, str]:
    """Save the snapshot in the run store; (its id, the local directory jobs of this backend import it from)."""
    code_url = snapshots.save(snap, url)
    on_log_dir = backend_class(launcher.backend).shared_log_dir and not roots.is_local(url)
    cache = Path(log_dir.split("://", 1)[-1]) / "code" if on_log_dir else snapshots.default_cache()
    return snap.id, str(snapshots.local_copy(code_url, cache))
