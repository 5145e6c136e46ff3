"""Submitting the chosen jobs of a sweep: specs, status records and manifest, the backend call, and, for sweeps
that run here (a backend that `runs_here`, or a private cluster started for the sweep), progress until the stages
end.

Nothing is written before the backend is ready: a private cluster that fails to start leaves the store untouched.
When the backend refuses the submission, every status.json touched is put back as it was. A run store on an object
store is first probed for the conditional writes the stage lease relies on, and refused (exit code 2) without them.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.text import Text

from extrema.run import rundir
from extrema.run.contract import StageDir, StageState, os_reason, update_status
from extrema.run.lease import probe_conditional_writes
from launch.backends.base import Backend, Job, State, backend_class
from launch.inputs.errors import UsageError
from launch.progress import Watch, follow
from launch.runstore import store
from launch.sweepfile.model import LauncherSpec

OK, FAILED, INTERRUPTED = 0, 1, 130


@dataclass
class Submission:
    """What one `sweep` sends: the jobs, the manifest to record, where logs go."""

    url: str
    jobs: list[Job]
    specs: Mapping[str, Any]  # job key -> RunSpec to write as spec.json
    manifest: dict[str, Any]
    log_dir: str
    previous: Mapping[str, dict[str, Any]]  # job key -> status.json before this submission
    code: str | None = None  # the id of the code snapshot the jobs run (launch.runstore.snapshot), None without one


@contextlib.contextmanager
def backend_for(launcher: LauncherSpec, out: Console) -> Iterator[tuple[Backend, dict[str, Any] | None]]:
    """The backend to submit to, and the manifest record of the private cluster started for it (stopped on exit;
    None when the launcher names a cluster or the backend needs none)."""
    kind = backend_class(launcher.backend)
    private = kind.private_cluster(launcher)
    if private is None:
        yield kind.from_launcher(launcher), None
        return
    with private.start(out) as (there, record):
        yield kind.from_launcher(there), record


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_blocking(
    backend: Backend, ids: dict[str, str], jobs: dict[str, Job], console: Console, watch: Watch | None = None
) -> int:
    """Show progress until the submitted jobs end; on Ctrl-C (or SIGTERM, SIGHUP) stop them cleanly, resumable."""
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        final = follow(backend, ids, jobs, console, watch=watch)
    except KeyboardInterrupt:
        console.print("interrupted: stopping running stages (SIGTERM) ...")
        with _sigint_ignored():
            backend.cancel(list(ids.values()))
            for job in jobs.values():
                store.mark_ended(StageDir.of(job.run_dir, job.stage).url, StageState.CANCELLED, "interrupted")
        console.print("stopped; `extrema-launch sweep` again resumes the unfinished stages")
        return INTERRUPTED
    except Exception as e:  # the backend went away under us (a cluster stopped, a connection lost)
        console.print(Text(f"lost track of the jobs: {type(e).__name__}: {e}", style="red"))
        if backend.adopts_running:  # its stages are this process's children: stop them, resumably, not orphan them
            with _sigint_ignored(), contextlib.suppress(Exception):
                backend.cancel(list(ids.values()))
                console.print("stopped the running stages; `extrema-launch sweep` again resumes them")
        return FAILED
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return FAILED if any(s in (State.FAILED, State.UNKNOWN) for s in final.values()) else OK


def _put_back(jobs: list[Job], previous: Mapping[str, dict[str, Any]]) -> None:
    """Restore the status records a failed submission touched, as far as the store lets us; a record that cannot
    be restored stays pending without a job id, which the next `sweep` submits again."""
    for job in jobs:
        with contextlib.suppress(OSError):
            rundir.write_json(StageDir.of(job.run_dir, job.stage).status, previous[job.key])


def check_leases_hold(url: str) -> None:
    """Refuse (UsageError) a run store on an object store that ignores conditional writes: there two attempts of a
    stage could both take its lease. Local and shared filesystems are not probed (their exclusive create is a link)."""
    if rundir.local_path(url) is not None:
        return
    why = probe_conditional_writes(url)
    if why is not None:
        raise UsageError(f"run store {url} cannot hold stage leases, it ignores conditional writes: {why}")


def submit(s: Submission, launcher: LauncherSpec, out: Console, watch: Watch | None = None) -> int:
    """Write specs, record the submission, submit; block with progress when the stages run here."""
    try:
        check_leases_hold(s.url)
    except OSError as e:
        out.print(Text(f"submission stopped before any job was sent: {os_reason(e)}", style="red"))
        return FAILED
    with backend_for(launcher, out) as (backend, private):
        now = time.time()
        written: list[Job] = []
        try:
            for job in s.jobs:
                stage = rundir.join(job.run_dir, job.stage)
                store.write_spec(stage, s.specs[job.key])
                store.mark_submitted(stage, launcher.backend, None, now, code=s.code)
                written.append(job)
        except OSError as e:
            _put_back(written, s.previous)
            out.print(Text(f"submission stopped before any job was sent: {os_reason(e)}", style="red"))
            return FAILED
        try:
            ids = backend.submit(s.jobs, s.log_dir)
        except Exception as e:
            _put_back(s.jobs, s.previous)
            out.print(Text(f"submission to {launcher.backend} failed: {type(e).__name__}: {e}", style="red"))
            return FAILED
        extra = {"cluster": backend.address} if backend.address else {}
        record = {k: {"job_id": v, "backend": launcher.backend, "submitted_at": now, **extra} for k, v in ids.items()}
        try:
            for job in s.jobs:
                if job.key in ids:
                    update_status(rundir.join(job.run_dir, job.stage), job_id=ids[job.key], **extra)
            store.write_manifest(s.url, {**s.manifest, "jobs": record, "submitted_at": now, **(private or {})})
        except OSError as e:  # the jobs are out; each stage records its own job id when it starts
            out.print(Text(f"jobs submitted, but recording their ids failed: {os_reason(e)}", style="red"))
        out.print(f"submitted {len(ids)} of {len(s.jobs)} jobs to {launcher.backend}")
        if not backend.runs_here and private is None:
            return OK
        by_key = {j.key: j for j in s.jobs}
        try:
            return run_blocking(backend, ids, by_key, out, watch)
        finally:
            if private is not None:
                backend.keep_logs(ids, by_key)
