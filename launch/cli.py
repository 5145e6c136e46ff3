"""`extrema-launch`: run sweeps of ExtreMA experiments and look after them.

    extrema-launch sweep   FILE [--backend local|slurm|ray] [--root URL] [--dry-run] [--retry-failed]
                           [--snapshot on|off] [--allow-code-change] [--quiet | --json-events] [--progress-every S]
    extrema-launch status  FILE|URL
    extrema-launch status  FILE|URL --watch [--interval S]
    extrema-launch results FILE|URL [--format table|csv|parquet|json] [--out PATH]
    extrema-launch results FILE|URL --group-by [AXIS ...]             (mean, std, count over seeds)
    extrema-launch results FILE|URL --pivot ROWS COLUMNS --metric M [--stage S]
    extrema-launch plot    FILE|URL --out DIR [--axis AXIS]
    extrema-launch report  FILE|URL --out report.html
    extrema-launch viz attention FILE|URL --run ID [--images I ...] [--queries cls|P ...] [--out DIR]
    extrema-launch cancel  FILE|URL [--run ID]
    extrema-launch logs    FILE|URL --run ID --stage S [--follow]
    extrema-launch export  FILE|URL --run ID [--branch ema|student] --format timm|official|safetensors --out PATH
    extrema-launch data shard SRC_URL DST_URL [--shard-size 1GB]

FILE|URL is a sweep YAML file or the `<root>/<sweep>` URL of a run store. Every job runs the code snapshot its
`sweep` took (`<root>/<sweep>/code/<id>/`), not whatever is installed when it starts (`--snapshot off`).

Backends: `local` runs the stages on this machine and shows progress until they end (Ctrl-C stops them,
resumably). `slurm` and `ray` return once the jobs are submitted. `ray` submits to launcher.ray_address, else
RAY_ADDRESS; with neither set it starts a private local Ray head for the sweep (its own ports, HOME and temp
dir), shows progress until the stages end like `local`, keeps each job's log in the stage's logs/, and stops it.

`status`, `cancel` and `logs` ask the backends (squeue/sacct, the Ray job API, the PID of a local sweep) and need
not run where the sweep was submitted; a stage whose job ended or vanished behind the run store's back is recorded
as failed or cancelled (a cancelled stage is resumed by the next `sweep`).

Exit codes: 0 success; 1 a job failed (sweep, status, logs --follow), a backend could not cancel, or `plot` found
nothing to plot; 2 invalid input or usage: nothing is submitted or written; 3 a record of the run store is
unreadable (each is listed with its path and reason; every readable row is shown, the damaged ones are held
back); 130 interrupted. `results` exits 0 once the table is out, failed stages included (see its state column).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from extrema.run import contract, lease, rundir
from extrema.run.contract import StageState
from launch import export_command, logs, results, roots, shard_command, store, tables
from launch import snapshot as snapshots
from launch.addressed import (
    DAMAGED,
    FAILED,
    INTERRUPTED,
    OK,
    USAGE,
    open_addressed,
    print_notes,
    print_unreadable,
    swept_axes,
)
from launch.backends.base import BACKENDS, backend_class, in_flight_groups, make_backend
from launch.backends.local import stop_attempts
from launch.errors import DamagedStore, InvalidSweep, UsageError
from launch.log_source import Lines
from launch.pipeline import Decision, plan, select
from launch.progress import Watch
from launch.reconcile import reconcile
from launch.results_view import cmd_plot, cmd_results, cmd_viz_attention, positive, query
from launch.status_view import show_status, status_code, status_table, watch_status
from launch.submit import Submission, submit
from launch.sweep import STAGE_ORDER, LauncherSpec, load_runs
from launch.tables import cell


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


def cmd_sweep(args: argparse.Namespace, out: Console) -> int:
    """Validate, expand, plan, print the plan and submit what is not done or in flight."""
    sweep, runs = load_runs(args.file, backend=args.backend, root=args.root)
    url = store.sweep_url(sweep.root, sweep.name)
    launcher = sweep.launcher
    if url.startswith("memory://") and not args.dry_run:
        raise UsageError("root memory:// lives in this process only; the stages run in other processes")
    roots.check_usable(url, write=not args.dry_run)
    jobs = plan(runs, launcher, url)
    statuses = store.read_statuses(url, [j.key for j in jobs])
    problems = store.unreadable(statuses)
    try:
        old_manifest = store.read_manifest(url)
    except store.Unreadable as e:
        old_manifest, problems = None, [*problems, f"{e} (kept beside as {store.MANIFEST}.damaged-<time>)"]
    seen = reconcile(url, statuses, launcher, old_manifest, write=not args.dry_run)
    kind = backend_class(launcher.backend)
    adopt = {k for k in seen.holders if kind.adopts_running}
    decisions = select(jobs, seen.states, args.retry_failed, stuck=seen.stuck, adopt=adopt)
    listed = [r.stored() for r in runs]
    todo = [d.job for d in decisions if d.submit]
    show_plan(out, f"sweep {sweep.name}: {len(runs)} runs, {len(jobs)} jobs -> {url}", decisions, listed)
    print_notes(out, seen)
    print_unreadable(out, problems)
    private = kind.private_cluster(launcher)
    where = launcher.backend + (f" ({private.what})" if private else "")
    use_snapshot = launcher.snapshot if args.snapshot is None else args.snapshot == "on"
    snapshot = take_snapshot(use_snapshot, out) if todo else None
    if args.dry_run:
        out.print(f"dry run: would submit {len(todo)} of {len(jobs)} jobs to {where}; nothing written")
        return OK
    held_back = FAILED if any(d.state == StageState.FAILED and not d.submit for d in decisions) else OK
    held_back = DAMAGED if problems else held_back
    log_dir = launcher.slurm_folder or rundir.join(url, "logs")
    manifest = {
        "sweep": sweep.name,
        "root": store.normalize_root(sweep.root),
        "source": str(Path(args.file).resolve()),
        "backend": launcher.backend,
        "launcher": launcher.model_dump(mode="json"),
        "log_dir": log_dir,
        "runs": [{"run_id": r.run_id, "stages": list(r.stages), "overrides": r.overrides} for r in runs],
        "created_at": time.time(),
    }
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
        code_id, code_dir = store_snapshot(snapshot, url, launcher, log_dir)
        manifest["code"] = {"id": code_id, "git_sha": snapshot.git_sha, "changed": list(snapshot.changed)}
        todo = [replace(j, code_dir=code_dir, allow_code_change=args.allow_code_change) for j in todo]
    elif args.allow_code_change:
        todo = [replace(j, allow_code_change=True) for j in todo]
    watch = Watch("json" if args.json_events else "quiet" if args.quiet else "auto", args.progress_every)
    code = submit(Submission(url, todo, specs, manifest, log_dir, previous, code_id), launcher, out, watch)
    return code if code != OK else held_back


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


def cmd_report(args: argparse.Namespace, out: Console) -> int:
    """Write one self-contained HTML file of the sweep: status, results, figures, pictures, provenance (nothing
    written into the run store); exit 3 when a record or picture of it is unreadable (listed)."""
    from extrema.run.contract import os_reason
    from launch import report

    target = open_addressed(args.target, args.root)
    page, problems = report.render(target)
    try:
        size = report.write(args.out, page)
    except OSError as e:
        raise UsageError(f"cannot write --out {args.out}: {os_reason(e)}") from None
    out.print(f"wrote {args.out} ({size / 1e6:.1f} MB), a page that needs no network")
    print_unreadable(out, problems)
    return DAMAGED if problems else OK


def cmd_status(args: argparse.Namespace, out: Console) -> int:
    """One table of every run and stage: state, attempts, elapsed time, latest metric; backends asked."""
    target = open_addressed(args.target, args.root)
    if args.watch:
        return watch_status(target, out, args.interval)
    view = status_table(target)
    show_status(out, target.url, view)
    return status_code(view)


def cmd_cancel(args: argparse.Namespace, out: Console) -> int:
    """Cancel the pending, running and preempted stages of a sweep (or of one run) and record them cancelled; a
    local attempt is signalled only when its process is proven to be the stage's (else: "not stopped: <why>")."""
    target = open_addressed(args.target, args.root)
    runs = target.runs
    if args.run:
        runs = [r for r in runs if r.run_id == args.run]
        if not runs:
            raise UsageError(f"run {args.run!r} is not part of {target.url}")
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
    for k, why in stop_attempts(target.url, {k: h for k, h in holders.items() if k not in kept}).items():
        kept.append(k)
        out.print(Text(f"{k}: not stopped: {why}", style="red"), soft_wrap=True)
    done = [k for k in live if k not in kept]
    unrecorded = 0
    for k in done:
        try:
            store.record_ended(stages[k], StageState.CANCELLED, "cancelled by user")
        except OSError as e:  # a read-only store: the job is stopped, the record cannot say so
            unrecorded += 1
            out.print(Text(f"{k}: stopped, not recorded: {contract.os_reason(e)}", style="yellow"), soft_wrap=True)
    out.print(f"cancelled {len(done)} stage job(s)" + (f": {', '.join(done)}" if done else ""))
    print_unreadable(out, store.unreadable(statuses))
    return FAILED if kept or unrecorded else DAMAGED if store.unreadable(statuses) else OK


def cmd_logs(args: argparse.Namespace, out: Console) -> int:
    """Print a stage's logs (local files, Slurm job files, Ray job log); with --follow until the stage ends."""
    target = open_addressed(args.target, args.root)
    run = next((r for r in target.runs if r.run_id == args.run), None)
    if run is None:
        raise UsageError(f"run {args.run!r} is not part of {target.url}")
    if args.stage not in run.stages:
        raise UsageError(f"run {args.run} has no stage {args.stage!r} (its stages: {', '.join(run.stages)})")
    key = store.job_key(args.run, args.stage)
    stage_dir = store.stage_url(target.url, args.run, args.stage)
    offsets: dict[str, int] = {}
    lines: dict[str, Lines] = {}
    ranks: object = None
    broken: set[str] = set()
    state: str | None = None
    try:
        while True:
            status = store.read_status(stage_dir)
            state = status.get("state")
            if args.follow:
                state = reconcile(target.url, {key: status}, target.launcher, target.manifest, write=True).states[key]
            fresh = logs.stage_ranks(stage_dir)
            sources = logs.sources(stage_dir, status, target.manifest, target.launcher, fresh)
            for src in sources:
                if src.name not in lines or fresh != ranks:
                    lines.setdefault(src.name, Lines(src.label)).label = src.label
                try:
                    chunk = src.read(offsets.get(src.name, 0))
                except Exception as e:
                    if src.name not in broken:
                        broken.add(src.name)
                        out.print(Text(f"cannot read {src.name}: {type(e).__name__}: {e}", style="yellow"))
                    continue
                named = len(sources) > 1 or not src.name.startswith(stage_dir)  # a lone logs/ file goes bare
                if chunk and not offsets.get(src.name) and named:
                    out.print(Text(logs.heading(src.name), style="bold"), soft_wrap=True)
                text = lines[src.name].feed(chunk.decode(errors="replace"), final=not args.follow)
                if text:
                    sys.stdout.write(text)
                    sys.stdout.flush()
                offsets[src.name] = offsets.get(src.name, 0) + len(chunk)
            ranks = fresh
            if not args.follow or state not in contract.IN_FLIGHT:
                sys.stdout.write("".join(pending.feed("", final=True) for pending in lines.values()))
                if not any(offsets.values()):
                    out.print(f"no logs yet for {key} ({state or 'not submitted'})")
                return FAILED if args.follow and state == StageState.FAILED else OK
            time.sleep(1.0)
    except KeyboardInterrupt:
        return OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="extrema-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Any, help: str, more: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help, description=f"{help}.\n\n{more}", formatter_class=argparse.RawDescriptionHelpFormatter
        )
        p.set_defaults(fn=fn)
        return p

    target_help = "a sweep YAML file, or the <root>/<sweep> URL of a run store"
    p = command(
        "sweep",
        cmd_sweep,
        "validate a sweep file, print the plan and submit what is not done",
        "Completed and in-flight stages are never submitted again; cancelled and vanished ones are resumed; failed\n"
        "ones only with --retry-failed. local: runs here, with progress, until every stage ends (Ctrl-C stops\n"
        "them, resumably). slurm: job arrays through submitit; returns once submitted. ray: Ray jobs to\n"
        "launcher.ray_address, else RAY_ADDRESS; returns once submitted. With neither set, a private local Ray\n"
        "head is started for the sweep (explicit free ports, its own HOME and temp dir), the sweep shows progress\n"
        "until the stages end, keeps each job's log in <stage>/logs/ and stops that head by its PID.\n"
        "Exit codes: 0 submitted (or all done), 1 a stage failed or the submission failed, 2 invalid input\n"
        "(nothing submitted, nothing written), 3 an unreadable record (listed; the rest submitted), 130 interrupted.",
    )
    p.add_argument("file", help="sweep YAML file")
    p.add_argument("--backend", choices=sorted(BACKENDS), help="override launcher.backend")
    p.add_argument("--root", help="override root: the run store URL (default ./runs)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; submit and write nothing")
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
    p.add_argument(
        "--allow-code-change",
        action="store_true",
        help="let stages resume checkpoints written by other code (recorded in their provenance)",
    )
    p = command(
        "status",
        cmd_status,
        "one table of every run and stage with state, attempts, elapsed, latest metric",
        "Stages the run store shows in flight are checked with their backend (squeue/sacct, the Ray job API, the\n"
        "PID of a local sweep); one whose job ended or vanished is recorded failed or cancelled.\n"
        "--watch refreshes the table until every stage has ended (completed, failed or cancelled; stages not\n"
        "submitted yet keep it waiting); Ctrl-C stops watching.\n"
        "Exit codes: 0, 1 when a stage failed, 2 invalid input, 3 an unreadable record (listed), 130 interrupted.",
    )
    p.add_argument("target", metavar="FILE|URL", help=target_help)
    p.add_argument("--root", help="run store URL when FILE was swept with --root")
    p.add_argument("--watch", action="store_true", help="refresh the table until every stage has ended")
    p.add_argument("--interval", type=positive, default=5.0, metavar="S", help="seconds between refreshes (5)")
    p = command(
        "results",
        cmd_results,
        "one table with a row per run and stage: swept values, metrics, provenance",
        "--group-by AXIS... gives one row per stage and value of those axes, each numeric metric as mean, sample\n"
        "std and count over the runs that differ only in seed; with no AXIS, every swept axis but the seeds.\n"
        "--pivot ROWS COLUMNS --metric M lays one metric out with one swept axis down and another across, each\n"
        "cell mean ± std (n) over seeds; --stage S picks the stage when several report M.\n"
        "--out writes csv, parquet or json (from --format, else the file's suffix) to any fsspec URL, atomically.\n"
        "Exit codes: 0 once the table is out (failed stages are rows too: see the state column), 2 invalid input,\n"
        "3 an unreadable record (listed; its fields are empty).",
    )
    p.add_argument("target", metavar="FILE|URL", help=target_help)
    p.add_argument("--format", choices=("table", "csv", "parquet", "json"), help="output format (default: table)")
    p.add_argument("--out", help="write to this path or URL instead of the terminal")
    p.add_argument("--root", help="run store URL when FILE was swept with --root")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--group-by", nargs="*", metavar="AXIS", help="aggregate over seeds, grouped by these axes")
    view.add_argument(
        "--pivot", nargs=2, metavar=("ROWS", "COLUMNS"), help="one metric: ROWS axis down, COLUMNS across"
    )
    p.add_argument("--code", metavar="ID", help="only stages that ran this code snapshot (an id or its start)")
    p.add_argument("--metric", help="the metric of --pivot (e.g. knn_top1)")
    p.add_argument("--stage", choices=STAGE_ORDER, help="the stage of --pivot's metric, when several report it")
    p = command(
        "plot",
        cmd_plot,
        "draw the sweep's figures as PNG and SVG",
        "Figure 1: training loss and kNN accuracy against epoch from the pretrain logs, one line per value of\n"
        "--axis (default model.cls_token when swept), mean and a band of one std over seeds. Then every plotted\n"
        "metric a stage reports (kNN, probe, finetune, inpainting) against each swept axis, error bars over seeds.\n"
        "Each caption names the sweep and its run ids. --out is a directory or fsspec URL.\n"
        "Exit codes: 0, 1 when there is nothing to plot yet, 2 invalid input.",
    )
    p.add_argument("target", metavar="FILE|URL", help=target_help)
    p.add_argument("--out", required=True, metavar="DIR", help="directory or URL for the figures")
    p.add_argument("--axis", help="the axis of Figure 1's lines (default: model.cls_token when swept)")
    p.add_argument("--root", help="run store URL when FILE was swept with --root")
    p = command(
        "viz",
        None,
        "figures of one run",
        "viz attention: last-layer attention maps of chosen queries (Figure 3).",
    )
    figure = p.add_subparsers(dest="figure", required=True, metavar="FIGURE")
    p = figure.add_parser(
        "attention",
        help="last-layer attention maps of one run (Figure 3)",
        description="Last-layer attention maps of one run (Figure 3), mean over heads, overlaid on the inputs.\n\n"
        "Rows are images of the run's dataset, columns the queries: cls (the instance token; not in the avgpool\n"
        "design) and patch indices (row-major). The encoder comes from the run's pretrain export, else its newest\n"
        "checkpoint. Writes attention.png and attention.svg to --out (default <run>/viz).\n"
        "Exit codes: 0, 2 invalid input (unknown run, no checkpoint yet, an image or patch out of range).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.set_defaults(fn=cmd_viz_attention)
    p.add_argument("target", metavar="FILE|URL", help=target_help)
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--images", nargs="+", type=int, default=[0, 1, 2, 3], metavar="I", help="image indices (0 1 2 3)")
    p.add_argument("--queries", nargs="+", type=query, metavar="Q", help="cls and/or patch indices (default: cls and "
                   "three patches on the diagonal)")  # fmt: skip
    p.add_argument("--branch", choices=("ema", "student"), default="ema", help="which encoder (ema)")
    p.add_argument("--split", choices=("val", "train"), default="val", help="which split's images (val)")
    p.add_argument("--out", metavar="DIR", help="directory or URL for the figure (default: <run>/viz)")
    p.add_argument("--root", help="run store URL when FILE was swept with --root")
    p = command(
        "cancel",
        cmd_cancel,
        "cancel pending, running and preempted stages of a sweep (or of one run)",
        "Asks each stage's backend to stop its job (scancel, Ray stop_job; a local sweep stops the stage at its\n"
        "next poll) and records the stage cancelled; `sweep` resumes it later.\n"
        "Exit codes: 0, 1 when a backend could not be asked (those stages are left as they are), 2 invalid input.",
    )
    p.add_argument("target", metavar="FILE|URL", help=target_help)
    p.add_argument("--run", help="only this run id")
    p.add_argument("--root", help="run store URL when FILE was swept with --root")
    p = command(
        "report",
        cmd_report,
        "write one self-contained HTML page of a sweep",
        "The sweep and its axes, the status table, results averaged over seeds, every figure of `plot`, the\n"
        "runs' attention maps and inpainting pictures, and provenance, in one file that opens without a network.\n"
        "Exit codes: 0, 2 invalid input.",
    )
    p.add_argument("target", metavar="FILE|URL", help=target_help)
    p.add_argument("--out", required=True, metavar="PATH", help="the HTML file (a path or URL)")
    p.add_argument("--root", help="run store URL when FILE was swept with --root")
    p = command(
        "logs",
        cmd_logs,
        "print the logs of one stage of one run",
        "The stage's logs/ files (local backend, kept Ray logs), its Slurm job's submitit .out/.err files, or its\n"
        "Ray job's log. --follow keeps printing until the stage ends (asking its backend).\n"
        "Exit codes: 0, 1 when a followed stage failed, 2 invalid input.",
    )
    p.add_argument("target", metavar="FILE|URL", help=target_help)
    p.add_argument("--run", required=True, help="run id")
    p.add_argument("--stage", required=True, choices=STAGE_ORDER, help="stage")
    p.add_argument("--follow", action="store_true", help="keep printing until the stage ends")
    p.add_argument("--root", help="run store URL when FILE was swept with --root")
    export_command.add_parser(sub)
    shard_command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 a job failed, 2 invalid input or usage, 130 interrupted)."""
    wide = None if sys.stdout.isatty() else 160  # pipes and logs get whole tables, not 80-column ones
    out, err = Console(width=wide), Console(stderr=True)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else USAGE
    if getattr(args, "json_events", False):  # standard output carries the events alone
        out = Console(stderr=True, width=wide)
    try:
        code: int = args.fn(args, out)
        return code
    except InvalidSweep as e:
        err.print(Text("invalid sweep (nothing submitted, nothing written):", style="bold red"))
        err.print(e.render(), markup=False, highlight=False, soft_wrap=True)
        return USAGE
    except UsageError as e:
        err.print(Text(f"extrema-launch: {e}", style="red"), soft_wrap=True)
        return USAGE
    except DamagedStore as e:
        err.print(Text(f"extrema-launch: unreadable run store record: {e}", style="red"), soft_wrap=True)
        return DAMAGED
    except KeyboardInterrupt:
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
