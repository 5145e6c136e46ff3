"""`extrema-launch`: run sweeps of ExtreMA experiments and look after them.

    extrema-launch sweep   FILE [--backend local|slurm|ray] [--root URL] [--dry-run] [--retry-failed]
    extrema-launch status  FILE|URL
    extrema-launch results FILE|URL [--format table|csv|parquet|json] [--out PATH]
    extrema-launch cancel  FILE|URL [--run ID]
    extrema-launch logs    FILE|URL --run ID --stage S [--follow]

FILE|URL is a sweep YAML file or the `<root>/<sweep>` URL of a run store.

Backends: `local` runs the stages on this machine and shows progress until they end (Ctrl-C stops them,
resumably). `slurm` and `ray` return once the jobs are submitted. `ray` submits to launcher.ray_address, else
RAY_ADDRESS; with neither set it starts a private local Ray head for the sweep (its own ports, HOME and temp
dir), shows progress until the stages end like `local`, keeps each job's log in the stage's logs/, and stops it.

`status`, `cancel` and `logs` ask the backends (squeue/sacct, the Ray job API, the PID of a local sweep) and need
not run where the sweep was submitted; a stage whose job ended or vanished behind the run store's back is recorded
as failed or cancelled (a cancelled stage is resumed by the next `sweep`).

Exit codes: 0 success; 1 a job failed (sweep, status, logs --follow) or a backend could not cancel; 2 invalid
input or usage: nothing is submitted or written; 130 interrupted. `results` exits 0 once the table is out,
failed stages included (see its state column).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from extrema import rundir
from launch import logs, results, store, tables
from launch.backends.base import BACKENDS, make_backend
from launch.errors import InvalidSweep, UsageError
from launch.pipeline import Decision, plan, select
from launch.progress import latest_progress
from launch.reconcile import Reconciled, ray_address, reconcile
from launch.submit import Submission, needs_local_ray, submit
from launch.sweep import STAGE_ORDER, LauncherSpec, SweepFile, load_runs
from launch.tables import cell

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json"}
__all__ = ["BACKENDS", "UsageError", "main", "make_backend"]


@dataclass
class Target:
    """A sweep addressed on the command line: its store URL, its runs and launcher, and the file if any."""

    url: str
    runs: list[store.RunEntry]
    launcher: LauncherSpec
    manifest: dict[str, Any] | None
    sweep: SweepFile | None = None


def is_sweep_file(arg: str) -> bool:
    """Whether a FILE|URL argument names a sweep YAML file rather than a run-store URL."""
    return arg.endswith((".yaml", ".yml")) or ("://" not in arg and Path(arg).is_file())


def open_target(arg: str, root: str | None = None) -> Target:
    """Resolve FILE|URL into the sweep it names."""
    if is_sweep_file(arg):
        sweep, runs = load_runs(arg, root=root)
        url = store.sweep_url(sweep.root, sweep.name)
        entries = [store.RunEntry(r.run_id, r.stages, r.overrides) for r in runs]
        return Target(url, entries, sweep.launcher, store.read_manifest(url), sweep)
    try:
        url = store.normalize_root(arg)
        manifest = store.read_manifest(url)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if manifest is None:
        raise UsageError(f"{arg}: not a sweep file, and no {store.MANIFEST} there")
    try:
        return Target(url, store.entries(manifest), LauncherSpec.model_validate(manifest.get("launcher", {})), manifest)
    except (ValidationError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"{url}/{store.MANIFEST} is damaged: {e}") from None


def _swept(runs: Sequence[store.RunEntry]) -> list[str]:
    return list(dict.fromkeys(p for r in runs for p in results.flatten(r.overrides)))


def show_plan(out: Console, title: str, decisions: Sequence[Decision], runs: Sequence[store.RunEntry]) -> None:
    """The plan: one row per job with its swept values, its state and what this submission does with it."""
    by_id = {r.run_id: results.flatten(r.overrides) for r in runs}
    paths = _swept(runs)
    columns = ("run", "stage", *paths, "state", "action")
    rows, styles, pairs = [], [], []
    for d in decisions:
        run_id, stage = d.job.key.split("/", 1)
        action = f"submit ({d.reason})" if d.submit else d.reason
        rows.append((run_id, stage, *(cell(by_id[run_id].get(p)) for p in paths), cell(d.state), action))
        styles.append({"action": "bold" if d.submit else "dim"})
        pairs.append((stage, action.split(" (", 1)[0] if d.submit else (d.state or "not submitted")))
    tables.show(out, title, columns, rows, styles, pairs)


def _notes(out: Console, seen: Reconciled) -> None:
    for note in seen.notes:
        out.print(Text(note, style="yellow"), soft_wrap=True)


def cmd_sweep(args: argparse.Namespace, out: Console) -> int:
    """Validate, expand, plan, print the plan and submit what is not done or in flight."""
    sweep, runs = load_runs(args.file, backend=args.backend, root=args.root)
    url = store.sweep_url(sweep.root, sweep.name)
    launcher = sweep.launcher
    if url.startswith("memory://") and not args.dry_run:
        raise UsageError("root memory:// lives in this process only; the stages run in other processes")
    if launcher.backend not in BACKENDS:
        raise UsageError(f"unknown backend {launcher.backend!r}")
    jobs = plan(runs, launcher, url)
    statuses = store.read_statuses(url, [j.key for j in jobs])
    old_manifest = store.read_manifest(url)
    seen = reconcile(url, statuses, launcher, old_manifest, write=not args.dry_run)
    decisions = select(jobs, seen.states, args.retry_failed)
    entries = [store.RunEntry(r.run_id, r.stages, r.overrides) for r in runs]
    todo = [d.job for d in decisions if d.submit]
    show_plan(out, f"sweep {sweep.name}: {len(runs)} runs, {len(jobs)} jobs -> {url}", decisions, entries)
    _notes(out, seen)
    where = launcher.backend + (" (a local Ray head started for this sweep)" if needs_local_ray(launcher) else "")
    if args.dry_run:
        out.print(f"dry run: would submit {len(todo)} of {len(jobs)} jobs to {where}; nothing written")
        return OK
    held_back = FAILED if any(d.state == "failed" and not d.submit for d in decisions) else OK
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
    specs = {j.key: by_run[store.split_key(j.key)[0]].spec(sweep.name, j.stage) for j in todo}
    previous = {j.key: statuses[j.key] for j in todo}
    code = submit(Submission(url, todo, specs, manifest, log_dir, previous), launcher, out)
    return code if code != OK else held_back


def _latest(state: str | None, status: dict[str, Any], result: Any, stage_dir: str) -> str:
    if state == "running":
        p = latest_progress(stage_dir)
        loss = f" loss {p['loss']:.4f}" if isinstance(p.get("loss"), (int, float)) else ""
        return f"step {p['step']}/{p['total_steps']}{loss}" if p.get("total_steps") else "started"
    if isinstance(result, dict):
        nums = {
            k: v for k, v in results.flatten(result).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        keys = sorted(nums, key=lambda k: ("top1" not in k, "loss" not in k, k))[:2]
        return " ".join(f"{k}={nums[k]:.4g}" for k in keys)
    error = status.get("error")
    return str(error)[:60] if error else ""


def _elapsed(status: dict[str, Any]) -> str:
    start, end = status.get("started_at"), status.get("finished_at")
    if not isinstance(start, (int, float)):
        return "-"
    seconds = (end if isinstance(end, (int, float)) else time.time()) - start
    return time.strftime("%H:%M:%S", time.gmtime(max(0.0, seconds)))


def cmd_status(args: argparse.Namespace, out: Console) -> int:
    """One table of every run and stage: state, attempts, elapsed time, latest metric; backends asked."""
    target = open_target(args.target, args.root)
    keys = [k for r in target.runs for k in r.job_keys()]
    statuses = store.read_statuses(target.url, keys)
    seen = reconcile(target.url, statuses, target.launcher, target.manifest, write=True)
    states = seen.states
    done = [k for k in keys if states.get(k) == "completed"]
    urls = [rundir.join(store.stage_url(target.url, *store.split_key(k)), "result.json") for k in done]
    found = dict(zip(done, store.read_many(urls)))
    paths = _swept(target.runs)
    columns = ("run", "stage", *paths, "state", "attempts", "elapsed", "latest", "job id")
    rows, styles, pairs = [], [], []
    for run in target.runs:
        flat = results.flatten(run.overrides)
        for stage, key in zip(run.stages, run.job_keys()):
            s, state = statuses[key], states.get(key)
            if key in seen.corrected:
                s = {**s, "error": seen.corrected[key]}
            latest = _latest(state, s, found.get(key), store.stage_url(target.url, run.run_id, stage))
            swept = (cell(flat.get(p)) for p in paths)
            rows.append((run.run_id, stage, *swept, cell(state), cell(s.get("attempts")), _elapsed(s), latest,
                         cell(s.get("job_id"))))  # fmt: skip
            styles.append({"state": tables.STATE_STYLES.get(state or "", "")})
            pairs.append((stage, state))
    tables.show(out, target.url, columns, rows, styles, pairs)
    _notes(out, seen)
    return FAILED if any(s == "failed" for s in states.values()) else OK


def results_format(fmt: str | None, out_path: str | None) -> str:
    """The output format: as given, else from the --out suffix, else a table on the terminal."""
    if out_path is None:
        if fmt == "parquet":
            raise UsageError("--format parquet needs --out PATH")
        return fmt or "table"
    if fmt == "table":
        raise UsageError("--format table prints to the terminal; with --out use csv, parquet or json")
    inferred = FORMATS.get(Path(out_path.rstrip("/")).suffix.lower())
    if fmt is None and inferred is None:
        raise UsageError(f"cannot tell the format of --out {out_path}: give --format csv, parquet or json")
    return fmt or str(inferred)


def cmd_results(args: argparse.Namespace, out: Console) -> int:
    """The results table of a sweep, printed or written as csv, parquet or json."""
    fmt = results_format(args.format, args.out)
    target = open_target(args.target, args.root)
    keys = [k for r in target.runs for k in r.job_keys()]
    statuses = store.read_statuses(target.url, keys)
    seen = reconcile(target.url, statuses, target.launcher, target.manifest, write=True)
    for key, why in seen.corrected.items():
        statuses[key] = {**statuses[key], "state": seen.states[key], "error": why}
    table = results.collect(target.url, target.runs, statuses)
    if args.out:
        try:
            results.write(table, args.out, fmt)  # type: ignore[arg-type]
        except (OSError, ImportError, ValueError) as e:
            raise UsageError(f"cannot write --out {args.out}: {type(e).__name__}: {e}") from None
        out.print(f"wrote {table.num_rows} rows x {table.num_columns} columns to {args.out}")
    elif fmt == "table":
        records = table.to_pylist()
        rows = [tuple(cell(v) for v in r.values()) for r in records]
        tables.show(out, target.url, table.column_names, rows, pairs=[(r["stage"], r["state"]) for r in records])
    else:
        sys.stdout.write(results.encode(table, fmt).decode())  # type: ignore[arg-type]
    _notes(out, seen)
    return OK


def cmd_cancel(args: argparse.Namespace, out: Console) -> int:
    """Cancel the pending, running and preempted stages of a sweep (or of one run) and record them cancelled."""
    target = open_target(args.target, args.root)
    runs = target.runs
    if args.run:
        runs = [r for r in runs if r.run_id == args.run]
        if not runs:
            raise UsageError(f"run {args.run!r} is not part of {target.url}")
    keys = [k for r in runs for k in r.job_keys()]
    statuses = store.read_statuses(target.url, keys)
    live = [k for k in keys if statuses[k].get("state") in store.IN_FLIGHT]
    groups: dict[tuple[str, str | None], dict[str, str]] = {}
    for k in live:
        s = statuses[k]
        if s.get("job_id") and s.get("backend") in BACKENDS:
            cluster = ray_address(s, target.launcher) if s["backend"] == "ray" else None
            groups.setdefault((str(s["backend"]), cluster), {})[k] = str(s["job_id"])
    kept: list[str] = []
    for (name, cluster), ids in groups.items():
        launcher = target.launcher.model_copy(update={"ray_address": cluster}) if name == "ray" else target.launcher
        try:
            make_backend(name, launcher).cancel(list(ids.values()))
        except Exception as e:
            kept += list(ids)
            out.print(Text(f"could not cancel {len(ids)} {name} job(s): {type(e).__name__}: {e}", style="red"))
    done = [k for k in live if k not in kept]
    for k in done:
        store.mark_ended(store.stage_url(target.url, *store.split_key(k)), "cancelled", "cancelled by user")
    out.print(f"cancelled {len(done)} stage job(s)" + (f": {', '.join(done)}" if done else ""))
    return FAILED if kept else OK


def cmd_logs(args: argparse.Namespace, out: Console) -> int:
    """Print a stage's logs (local files, Slurm job files, Ray job log); with --follow until the stage ends."""
    target = open_target(args.target, args.root)
    run = next((r for r in target.runs if r.run_id == args.run), None)
    if run is None:
        raise UsageError(f"run {args.run!r} is not part of {target.url}")
    if args.stage not in run.stages:
        raise UsageError(f"run {args.run} has no stage {args.stage!r} (its stages: {', '.join(run.stages)})")
    key = store.job_key(args.run, args.stage)
    stage_dir = store.stage_url(target.url, args.run, args.stage)
    offsets: dict[str, int] = {}
    broken: set[str] = set()
    state: str | None = None
    try:
        while True:
            status = store.read_status(stage_dir)
            state = status.get("state")
            if args.follow:
                state = reconcile(target.url, {key: status}, target.launcher, target.manifest, write=True).states[key]
            address = ray_address(status, target.launcher) if status.get("backend") == "ray" else None
            sources = logs.sources(stage_dir, status, target.manifest, address)
            for src in sources:
                try:
                    chunk = src.read(offsets.get(src.name, 0))
                except Exception as e:
                    if src.name not in broken:
                        broken.add(src.name)
                        out.print(Text(f"cannot read {src.name}: {type(e).__name__}: {e}", style="yellow"))
                    continue
                named = len(sources) > 1 or not src.name.startswith(stage_dir)  # a lone logs/ file goes bare
                if chunk and not offsets.get(src.name) and named:
                    out.print(Text(f"==> {src.name} <==", style="bold"))
                if chunk:
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
                offsets[src.name] = offsets.get(src.name, 0) + len(chunk)
            if not args.follow or state not in store.IN_FLIGHT:
                if not any(offsets.values()):
                    out.print(f"no logs yet for {key} ({state or 'not submitted'})")
                return FAILED if args.follow and state == "failed" else OK
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
        "(nothing submitted, nothing written), 130 interrupted.",
    )
    p.add_argument("file", help="sweep YAML file")
    p.add_argument("--backend", choices=sorted(BACKENDS), help="override launcher.backend")
    p.add_argument("--root", help="override root: the run store URL (default ./runs)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; submit and write nothing")
    p.add_argument("--retry-failed", action="store_true", help="resubmit failed stages too")
    p = command(
        "status",
        cmd_status,
        "one table of every run and stage with state, attempts, elapsed, latest metric",
        "Stages the run store shows in flight are checked with their backend (squeue/sacct, the Ray job API, the\n"
        "PID of a local sweep); one whose job ended or vanished is recorded failed or cancelled.\n"
        "Exit codes: 0, 1 when a stage failed, 2 invalid input.",
    )
    p.add_argument("target", metavar="FILE|URL", help=target_help)
    p.add_argument("--root", help="run store URL when FILE was swept with --root")
    p = command(
        "results",
        cmd_results,
        "one table with a row per run and stage: swept values, metrics, provenance",
        "--out writes csv, parquet or json (from --format, else the file's suffix) to any fsspec URL, atomically.\n"
        "Exit codes: 0 once the table is out (failed stages are rows too: see the state column), 2 invalid input.",
    )
    p.add_argument("target", metavar="FILE|URL", help=target_help)
    p.add_argument("--format", choices=("table", "csv", "parquet", "json"), help="output format (default: table)")
    p.add_argument("--out", help="write to this path or URL instead of the terminal")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 a job failed, 2 invalid input or usage, 130 interrupted)."""
    wide = None if sys.stdout.isatty() else 160  # pipes and logs get whole tables, not 80-column ones
    out, err = Console(width=wide), Console(stderr=True)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else USAGE
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
    except KeyboardInterrupt:
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
