"""`extrema-launch`: run sweeps of ExtreMA experiments and look after them.

    extrema-launch sweep jobs/tiny.yaml [--backend local|slurm|ray] [--root URL] [--dry-run] [--retry-failed]
    extrema-launch status  FILE|URL
    extrema-launch results FILE|URL [--format table|csv|parquet|json] [--out PATH]
    extrema-launch cancel  FILE|URL [--run ID]
    extrema-launch logs    FILE|URL --run ID --stage S [--follow]

FILE|URL is a sweep YAML file or the `<root>/<sweep>` URL of a run store. Exit codes: 0 success, 1 a job
failed, 2 invalid input or usage (nothing is submitted or written), 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from extrema import rundir
from launch import results, store
from launch.backends.base import Backend, Job, State
from launch.errors import InvalidSweep
from launch.pipeline import Decision, plan, select
from launch.progress import follow, latest_progress
from launch.sweep import STAGE_ORDER, LauncherSpec, SweepFile, load_runs

OK, FAILED, USAGE, INTERRUPTED = 0, 1, 2, 130
BACKENDS = {
    "local": "launch.backends.local:LocalBackend",
    "slurm": "launch.backends.slurm:SlurmBackend",
    "ray": "launch.backends.ray:RayBackend",
}


class UsageError(Exception):
    """A command that cannot run as asked; printed without a traceback, exit code 2."""


def make_backend(name: str, launcher: LauncherSpec) -> Backend:
    """Import a backend by name and build it from the launcher settings."""
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    module, _, attr = BACKENDS[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise UsageError(f"backend {name!r} is not available here: {e}") from None
    factory = getattr(cls, "from_launcher", None)
    backend: Backend = factory(launcher) if factory is not None else cls()
    return backend


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


def _ask(name: str, launcher: LauncherSpec, job_ids: list[str]) -> dict[str, State]:
    """The backend's states of its jobs; nothing when it cannot be asked (the store's word then stands)."""
    try:
        return make_backend(name, launcher).status(job_ids)
    except Exception:
        return {}


def effective_states(
    statuses: dict[str, dict[str, Any]], target_url: str, launcher: LauncherSpec
) -> dict[str, str | None]:
    """Each job's state from the run store, corrected by its backend for jobs the store shows in flight."""
    states: dict[str, str | None] = {k: s.get("state") for k, s in statuses.items()}
    asked: dict[str, dict[str, str]] = {}
    for key, s in statuses.items():
        if s.get("state") in store.IN_FLIGHT and s.get("job_id") and s.get("backend") in BACKENDS:
            asked.setdefault(s["backend"], {})[key] = str(s["job_id"])
    for name, ids in asked.items():
        answer = _ask(name, launcher, list(ids.values()))
        for key, job_id in ids.items():
            seen = answer.get(job_id, State.UNKNOWN)
            if seen in (State.COMPLETED, State.FAILED, State.CANCELLED):
                now = store.read_status(store.stage_url(target_url, *store.split_key(key))).get("state")
                states[key] = now if now in store.TERMINAL else ("cancelled" if seen == State.CANCELLED else "failed")
            elif seen == State.PREEMPTED:
                states[key] = "pending"
            elif seen in (State.PENDING, State.RUNNING):
                states[key] = seen.value
    return states


def _cell(value: Any) -> Text:
    return Text("-" if value is None else str(value))


def _swept(runs: Sequence[store.RunEntry]) -> list[str]:
    return list(dict.fromkeys(p for r in runs for p in results.flatten(r.overrides)))


def plan_table(title: str, decisions: Sequence[Decision], runs: Sequence[store.RunEntry]) -> Table:
    """The plan: one row per job with its swept values, its state and what this submission does with it."""
    by_id = {r.run_id: results.flatten(r.overrides) for r in runs}
    paths = _swept(runs)
    table = Table(title=title)
    for col in ("run", "stage", *paths, "state", "action"):
        table.add_column(col)
    for d in decisions:
        run_id, stage = store.split_key(d.job.key)
        action = Text(f"submit ({d.reason})", style="bold") if d.submit else Text(d.reason, style="dim")
        table.add_row(run_id, stage, *(_cell(by_id[run_id].get(p)) for p in paths), _cell(d.state), action)
    return table


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_blocking(backend: Backend, ids: dict[str, str], jobs: dict[str, Job], console: Console) -> int:
    """Show progress until the submitted jobs end; on Ctrl-C (or SIGTERM, SIGHUP) stop them cleanly, resumable."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        final = follow(backend, ids, jobs, console)
    except KeyboardInterrupt:
        console.print("interrupted: stopping running stages (SIGTERM) ...")
        with _sigint_ignored():
            backend.cancel(list(ids.values()))
        console.print("stopped; `extrema-launch sweep` again resumes the unfinished stages")
        return INTERRUPTED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return FAILED if any(s == State.FAILED for s in final.values()) else OK


def cmd_sweep(args: argparse.Namespace, out: Console) -> int:
    """Validate, expand, plan, print the plan and submit what is not done or in flight."""
    sweep, runs = load_runs(args.file, backend=args.backend, root=args.root)
    url = store.sweep_url(sweep.root, sweep.name)
    launcher = sweep.launcher
    if launcher.backend == "local" and url.startswith("memory://") and not args.dry_run:
        raise UsageError("root memory:// lives in this process only; the local backend runs stages in subprocesses")
    jobs = plan(runs, launcher, url)
    statuses = store.read_statuses(url, [j.key for j in jobs])
    decisions = select(jobs, effective_states(statuses, url, launcher), args.retry_failed)
    entries = [store.RunEntry(r.run_id, r.stages, r.overrides) for r in runs]
    todo = [d.job for d in decisions if d.submit]
    out.print(plan_table(f"sweep {sweep.name}: {len(runs)} runs, {len(jobs)} jobs -> {url}", decisions, entries))
    if args.dry_run:
        out.print(f"dry run: would submit {len(todo)} of {len(jobs)} jobs to {launcher.backend}; nothing written")
        return OK
    backend = make_backend(launcher.backend, launcher) if todo else None
    by_run = {r.run_id: r for r in runs}
    for job in todo:
        run_id, stage = store.split_key(job.key)
        store.write_spec(url, by_run[run_id].spec(sweep.name, stage))
    log_dir = launcher.slurm_folder or rundir.join(url, "logs")
    now = time.time()
    manifest = {
        "sweep": sweep.name,
        "root": store.normalize_root(sweep.root),
        "source": str(Path(args.file).resolve()),
        "backend": launcher.backend,
        "launcher": launcher.model_dump(mode="json"),
        "log_dir": log_dir,
        "runs": [{"run_id": r.run_id, "stages": list(r.stages), "overrides": r.overrides} for r in runs],
        "created_at": now,
    }
    if backend is None:
        store.write_manifest(url, manifest)
        out.print("nothing to submit: every job is completed, in flight, failed or waiting (see the action column)")
        return FAILED if any(d.state == "failed" for d in decisions) else OK
    previous = {j.key: statuses[j.key] for j in todo}
    for job in todo:
        store.mark_submitted(rundir.join(job.run_dir, job.stage), launcher.backend, None, now)
    try:
        ids = backend.submit(todo, log_dir)
    except Exception as e:
        for job in todo:
            rundir.write_json(rundir.join(job.run_dir, job.stage, "status.json"), previous[job.key])
        out.print(Text(f"submission to {launcher.backend} failed: {type(e).__name__}: {e}", style="red"))
        return FAILED
    for job in todo:
        if job.key in ids:
            store.set_status(rundir.join(job.run_dir, job.stage), job_id=ids[job.key])
    jobs_record = {k: {"job_id": v, "backend": launcher.backend, "submitted_at": now} for k, v in ids.items()}
    store.write_manifest(url, {**manifest, "jobs": jobs_record, "submitted_at": now})
    out.print(f"submitted {len(ids)} of {len(jobs)} jobs to {launcher.backend}")
    if launcher.backend != "local":
        return FAILED if any(d.state == "failed" and not d.submit for d in decisions) else OK
    code = run_blocking(backend, ids, {j.key: j for j in todo}, out)
    if code == OK and any(d.state == "failed" and not d.submit for d in decisions):
        return FAILED
    return code


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
    """One table of every run and stage: state, attempts, elapsed time, latest metric."""
    target = open_target(args.target, args.root)
    keys = [k for r in target.runs for k in r.job_keys()]
    statuses = store.read_statuses(target.url, keys)
    states = effective_states(statuses, target.url, target.launcher)
    done = [k for k in keys if states.get(k) == "completed"]
    found = dict(
        zip(
            done,
            store.read_many(
                [rundir.join(store.stage_url(target.url, *store.split_key(k)), "result.json") for k in done]
            ),
        )
    )
    paths = _swept(target.runs)
    table = Table(title=f"{target.url}")
    for col in ("run", "stage", *paths, "state", "attempts", "elapsed", "latest", "job id"):
        table.add_column(col)
    for run in target.runs:
        flat = results.flatten(run.overrides)
        for stage, key in zip(run.stages, run.job_keys()):
            s, state = statuses[key], states.get(key)
            latest = _latest(state, s, found.get(key), store.stage_url(target.url, run.run_id, stage))
            style = {"completed": "green", "failed": "red", "running": "cyan", "cancelled": "yellow"}.get(
                state or "", ""
            )
            cells = (*(_cell(flat.get(p)) for p in paths), Text(state or "-", style=style), _cell(s.get("attempts")))
            table.add_row(run.run_id, stage, *cells, Text(_elapsed(s)), Text(latest), _cell(s.get("job_id")))
    out.print(table)
    return FAILED if any(s == "failed" for s in states.values()) else OK


def cmd_results(args: argparse.Namespace, out: Console) -> int:
    """The results table of a sweep, printed or written as csv, parquet or json."""
    if args.format == "parquet" and not args.out:
        raise UsageError("--format parquet needs --out PATH")
    target = open_target(args.target, args.root)
    table = results.collect(target.url, target.runs)
    if args.out:
        results.write(table, args.out, args.format if args.format != "table" else "csv")
        out.print(f"wrote {table.num_rows} rows x {table.num_columns} columns to {args.out}")
    elif args.format == "table":
        view = Table(title=target.url)
        for name in table.column_names:
            view.add_column(name)
        for row in table.to_pylist():
            view.add_row(*(_cell(v) for v in row.values()))
        out.print(view)
    else:
        sys.stdout.write(results.encode(table, args.format).decode())
    return OK


def cmd_cancel(args: argparse.Namespace, out: Console) -> int:
    """Cancel the pending and running stages of a sweep (or of one run) and record them cancelled."""
    target = open_target(args.target, args.root)
    runs = target.runs
    if args.run:
        runs = [r for r in runs if r.run_id == args.run]
        if not runs:
            raise UsageError(f"run {args.run!r} is not part of {target.url}")
    keys = [k for r in runs for k in r.job_keys()]
    statuses = store.read_statuses(target.url, keys)
    live = [k for k in keys if statuses[k].get("state") in store.IN_FLIGHT]
    by_backend: dict[str, list[str]] = {}
    for k in live:
        if statuses[k].get("job_id") and statuses[k].get("backend") in BACKENDS:
            by_backend.setdefault(statuses[k]["backend"], []).append(str(statuses[k]["job_id"]))
    for name, ids in by_backend.items():
        make_backend(name, target.launcher).cancel(ids)
    for k in live:
        store.mark_ended(store.stage_url(target.url, *store.split_key(k)), "cancelled", "cancelled by user")
    out.print(f"cancelled {len(live)} stage job(s)" + (f": {', '.join(live)}" if live else ""))
    return OK


def _log_sources(target: Target, run_id: str, stage: str) -> list[str]:
    stage_dir = store.stage_url(target.url, run_id, stage)
    found = store.log_files(stage_dir)
    job_id = str(store.read_status(stage_dir).get("job_id") or "")
    log_dir = (target.manifest or {}).get("log_dir")
    if found or not job_id or not log_dir:
        return found
    try:
        store.safe_name(job_id.replace("@", "_"), "job id")
    except ValueError:
        return []
    fs, path = rundir.filesystem(log_dir)
    return sorted(fs.unstrip_protocol(p) if "://" in log_dir else p for p in fs.glob(f"{path}/*{job_id}*"))


def cmd_logs(args: argparse.Namespace, out: Console) -> int:
    """Print a stage's logs; with --follow keep printing until the stage ends."""
    target = open_target(args.target, args.root)
    if args.run not in {r.run_id for r in target.runs}:
        raise UsageError(f"run {args.run!r} is not part of {target.url}")
    stage_dir = store.stage_url(target.url, args.run, args.stage)
    offsets: dict[str, int] = {}
    try:
        while True:
            sources = _log_sources(target, args.run, args.stage)
            for url in sources:
                fs, path = rundir.filesystem(url)
                with fs.open(path, "rb") as f:
                    f.seek(offsets.get(url, 0))
                    chunk = f.read()
                if chunk:
                    if url not in offsets and len(sources) > 1:
                        out.print(Text(f"==> {url} <==", style="bold"))
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
                offsets[url] = offsets.get(url, 0) + len(chunk)
            if not args.follow:
                if not sources:
                    out.print(f"no logs yet for {args.run}/{args.stage}")
                return OK
            if store.read_status(stage_dir).get("state") in store.TERMINAL:
                return OK
            time.sleep(1.0)
    except KeyboardInterrupt:
        return OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="extrema-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(fn=fn)
        return p

    target_help = "a sweep YAML file, or the <root>/<sweep> URL of a run store"
    p = command("sweep", cmd_sweep, "validate a sweep file, print the plan and submit what is not done")
    p.add_argument("file", help="sweep YAML file")
    p.add_argument("--backend", choices=sorted(BACKENDS), help="override launcher.backend")
    p.add_argument("--root", help="override root: the run store URL (default ./runs)")
    p.add_argument("--dry-run", action="store_true", help="print the plan; submit and write nothing")
    p.add_argument("--retry-failed", action="store_true", help="resubmit failed stages too")
    p = command("status", cmd_status, "one table of every run and stage with state, attempts, elapsed, latest metric")
    p.add_argument("target", metavar="FILE|URL", help=target_help)
    p.add_argument("--root", help="run store URL when FILE was swept with --root")
    p = command("results", cmd_results, "one table with a row per run and stage: swept values, metrics, provenance")
    p.add_argument("target", metavar="FILE|URL", help=target_help)
    p.add_argument("--format", choices=("table", "csv", "parquet", "json"), default="table", help="output format")
    p.add_argument("--out", help="write to this path or URL instead of the terminal")
    p.add_argument("--root", help="run store URL when FILE was swept with --root")
    p = command("cancel", cmd_cancel, "cancel pending and running stages of a sweep (or of one run)")
    p.add_argument("target", metavar="FILE|URL", help=target_help)
    p.add_argument("--run", help="only this run id")
    p.add_argument("--root", help="run store URL when FILE was swept with --root")
    p = command("logs", cmd_logs, "print the logs of one stage of one run")
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
