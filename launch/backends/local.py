"""The local backend: stage jobs as subprocesses of this process, in dependency order, within a CPU/GPU budget.

Jobs start when the caller polls (`status`); `extrema-launch sweep` polls until every job has ended. A ready job
starts when fewer than `max_parallel` jobs run and its CPUs (cpus_per_task x processes_per_node) fit beside the
running ones in this machine's CPUs (a job larger than the machine runs alone), and its GPUs (gpus_per_node) are
free: those GPUs are its own, pinned with CUDA_VISIBLE_DEVICES. A spec that sets cpus_per_task gets that many intra-op
threads per process (OMP_NUM_THREADS, unless already set). A job asking more GPUs than the machine has fails
at once with the reason. Jobs asking no GPUs are not pinned (they see what this process sees). A job of several
processes runs under torchrun (`Job.command`).

Each job's stdout and stderr go, interleaved, to `<run-dir>/<stage>/logs/local.log` (appended across attempts, one
header line per attempt). A job whose upstream failed is not run and is recorded as failed ("not run: upstream
..."). `cancel` sends SIGTERM to the job's process group, waits `grace_s`, then SIGKILL, and records the stage as
cancelled so that the next `sweep` resumes it. A stage marked cancelled in the run store by another process
(`extrema-launch cancel`) is stopped at the next poll. Job ids are `local-<pid>-<n>@<host>`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from fsspec.implementations.local import LocalFileSystem

from extrema import contract, lease, rundir
from launch import store
from launch.backends.base import Backend, Job, State, code_env

if TYPE_CHECKING:
    from launch.sweep import LauncherSpec

LOG_NAME = "local.log"
_ID = re.compile(r"local-(\d+)-(\d+)@(.+)")
_ENDED = (State.COMPLETED, State.FAILED, State.CANCELLED)


def job_env(job: Job, job_id: str, gpus: tuple[str, ...], base: Mapping[str, str]) -> dict[str, str]:
    """The environment a local job starts with: `base` plus its job id, network settings, GPUs and CPU threads."""
    env = {**base, **job.env(), "EXTREMA_JOB_ID": job_id, "PYTHONUNBUFFERED": "1"}
    if job.code_dir:
        env.update(code_env(job.code_dir, base.get("PYTHONPATH")))
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    r = job.resources
    if "cpus_per_task" in r.model_fields_set:
        # One intra-op thread per granted CPU: jobs sharing the cores otherwise oversubscribe them several-fold.
        env.setdefault("OMP_NUM_THREADS", str(min(r.cpus_per_task, os.cpu_count() or 1)))
    return env


@dataclass
class _Task:
    job: Job
    job_id: str
    submitted: float
    state: State = State.PENDING
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None
    log_path: str = ""
    upload_to: str | None = None
    started: float | None = None
    returncode: int | None = field(default=None)
    gpus: tuple[str, ...] = ()

    @property
    def stage_dir(self) -> str:
        return rundir.join(self.job.run_dir, self.job.stage)


def machine_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def machine_gpus() -> tuple[str, ...]:
    """The GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else the NVIDIA devices the driver lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return tuple(d.strip() for d in visible.split(",") if d.strip() and not d.strip().startswith("-"))
    try:
        found = os.listdir("/proc/driver/nvidia/gpus")
    except OSError:
        return ()
    return tuple(str(i) for i in range(len(found)))


def demand(job: Job) -> tuple[int, int]:
    """(CPUs, GPUs) a job holds while it runs."""
    r = job.resources
    return r.cpus_per_task * r.processes_per_node, r.gpus_per_node


class LocalBackend(Backend):
    """Runs stage jobs as local subprocesses (no shell), in dependency order, within `max_parallel`, CPUs and GPUs."""

    name = "local"
    adopts_running = True  # a job for a stage a live attempt owns waits on its lease (extrema.lease)
    runs_here = True

    def __init__(
        self, max_parallel: int = 1, grace_s: float = 10.0, cpus: int | None = None, gpus: Sequence[str] | None = None
    ) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        self.max_parallel = max_parallel
        self.cpus = cpus if cpus is not None else machine_cpus()
        self.gpus = tuple(gpus) if gpus is not None else machine_gpus()
        self.grace_s = grace_s
        self.host = socket.gethostname()
        self._tasks: dict[str, _Task] = {}
        self._by_key: dict[str, str] = {}
        self._counter = itertools.count()

    @classmethod
    def from_launcher(cls, launcher: LauncherSpec, address: str | None = None) -> LocalBackend:
        """The backend a sweep's launcher section asks for (this machine: no address)."""
        return cls(max_parallel=launcher.max_parallel)

    def submit(self, jobs: Sequence[Job], log_dir: str) -> dict[str, str]:
        """Queue jobs; they start on the next poll. `log_dir` is unused: logs go to each stage's `logs/`."""
        out = {}
        now = time.time()
        for job in jobs:
            store.split_key(job.key)
            job_id = f"local-{os.getpid()}-{next(self._counter)}@{self.host}"
            self._tasks[job_id] = _Task(job, job_id, now)
            self._by_key[job.key] = job_id
            out[job.key] = job_id
        return out

    def status(self, job_ids: Sequence[str]) -> dict[str, State]:
        """Advance the queue (reap, start) and report each job's state; jobs of other hosts are left out."""
        self.poll()
        out = {i: self._tasks[i].state if i in self._tasks else self._foreign(i) for i in job_ids}
        return {i: s for i, s in out.items() if s is not None}

    def cancel(self, job_ids: Sequence[str]) -> None:
        """Stop the given jobs of this process (SIGTERM, then SIGKILL after `grace_s`) and record them cancelled."""
        tasks = [self._tasks[i] for i in job_ids if i in self._tasks and self._tasks[i].state not in _ENDED]
        self._terminate([t for t in tasks if t.proc is not None])
        for t in tasks:
            self._end(t, State.CANCELLED, "cancelled")

    def running(self) -> list[Job]:
        """The jobs whose processes are running now."""
        return [t.job for t in self._tasks.values() if t.state == State.RUNNING]

    def poll(self) -> None:
        """Reap finished processes, stop externally cancelled ones, skip jobs behind failures, start ready ones."""
        for t in self._tasks.values():
            if t.state == State.RUNNING and self._cancelled_in_store(t):
                self._terminate([t])
                self._end(t, State.CANCELLED, "cancelled")
            elif t.state == State.RUNNING and t.proc is not None and t.proc.poll() is not None:
                self._reap(t)
        for t in self._tasks.values():
            if t.state != State.PENDING:
                continue
            ups = [self._tasks[self._by_key[a]] for a in t.job.after if a in self._by_key]
            bad = next((u for u in ups if u.state in (State.FAILED, State.CANCELLED)), None)
            if bad is not None:
                self._end(t, bad.state, f"not run: upstream {bad.job.key} {bad.state.value}", write=True)
            elif self._cancelled_in_store(t):
                self._end(t, State.CANCELLED, "cancelled")
            elif all(u.state == State.COMPLETED for u in ups):
                self._start_within_budget(t)

    def _start_within_budget(self, t: _Task) -> None:
        cpus, gpus = demand(t.job)
        if gpus > len(self.gpus):
            self._end(t, State.FAILED, f"asks {gpus} GPU(s); this machine has {len(self.gpus)}", write=True)
            return
        running = [r for r in self._tasks.values() if r.state == State.RUNNING]
        used_cpus = sum(demand(r.job)[0] for r in running)
        taken = {g for r in running for g in r.gpus}
        free = [g for g in self.gpus if g not in taken]
        if len(running) >= self.max_parallel or (running and used_cpus + cpus > self.cpus) or len(free) < gpus:
            return
        t.gpus = tuple(free[:gpus])
        self._start(t)

    def _cancelled_in_store(self, t: _Task) -> bool:
        status = store.read_status(t.stage_dir)
        return status.get("state") == "cancelled" and float(status.get("finished_at") or 0) >= t.submitted

    def _foreign(self, job_id: str) -> State | None:
        """A job of another process: gone with its process when that ran on this host. None while that process
        lives (its job may be queued or running: the run store tells which) or when it ran on another host."""
        m = _ID.fullmatch(job_id)
        if not m:
            return State.UNKNOWN
        if m.group(3) != self.host or lease.process_alive(int(m.group(1)), None):
            return None
        return State.CANCELLED

    def _start(self, t: _Task) -> None:
        fs, path = rundir.filesystem(rundir.join(t.stage_dir, "logs", LOG_NAME))
        if isinstance(fs, LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            t.log_path = path
        else:
            fd, t.log_path = tempfile.mkstemp(prefix="extrema-", suffix=".log")
            os.close(fd)
            t.upload_to = rundir.join(t.stage_dir, "logs", LOG_NAME)
        t.log = open(t.log_path, "ab")  # noqa: SIM115 - closed when the job is reaped
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        t.log.write(f"=== {stamp} job {t.job_id} on {self.host}: {' '.join(t.job.command())}\n".encode())
        t.log.flush()
        t.proc = subprocess.Popen(
            t.job.command(),
            stdin=subprocess.DEVNULL,
            stdout=t.log,
            stderr=subprocess.STDOUT,
            env=job_env(t.job, t.job_id, t.gpus, os.environ),
            start_new_session=True,
        )
        t.started = time.time()
        t.state = State.RUNNING

    def _reap(self, t: _Task) -> None:
        assert t.proc is not None
        t.returncode = t.proc.returncode
        if t.returncode == contract.EXIT_OK:
            self._end(t, State.COMPLETED, "")
            return
        if t.returncode == contract.EXIT_LEASE_LOST:  # another attempt owns the stage: its record stands
            self._end(t, State.FAILED, "lost the stage's lease to another attempt", write=False)
            return
        stored = store.read_status(t.stage_dir).get("state")
        if stored == "cancelled" or t.returncode == contract.EXIT_REQUEUE:
            self._end(t, State.CANCELLED, "stopped at a signal (checkpoint saved); `sweep` resumes it", write=True)
            return
        self._end(t, State.FAILED, f"exit code {t.returncode}", write=True)

    def _terminate(self, tasks: list[_Task]) -> None:
        live = [t for t in tasks if t.proc is not None and t.proc.poll() is None]
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for t in live:
                assert t.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(t.proc.pid, sig)
            deadline = time.monotonic() + self.grace_s
            for t in live:
                assert t.proc is not None
                try:
                    t.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    continue
            live = [t for t in live if t.proc is not None and t.proc.poll() is None]
            if not live:
                break

    def _end(self, t: _Task, state: State, error: str, write: bool | None = None) -> None:
        """Close the job's log and record its end; the run store is written unless the stage wrote it itself."""
        t.state = state
        if t.log is not None:
            t.log.close()
            t.log = None
            if t.upload_to:
                fs, path = rundir.filesystem(t.upload_to)
                fs.put_file(t.log_path, path)
                os.unlink(t.log_path)
        if write or (write is None and state != State.COMPLETED):
            store.mark_ended(t.stage_dir, state.value, error)


def stop_attempts(holders: Mapping[str, lease.Holder], grace_s: float = 10.0) -> dict[str, str]:
    """Stop the local stage processes that own these stages (by job key), whoever started them: SIGTERM to each
    one's process group, SIGKILL after `grace_s`. Attempts of other backends are left to them. Returns
    key -> why an attempt could not be stopped."""
    failed: dict[str, str] = {}
    targets: dict[str, lease.Holder] = {}
    for key, h in holders.items():
        if not _ID.fullmatch(str(h.record.get("job_id") or "")):
            continue
        if h.host != socket.gethostname():
            failed[key] = f"its local attempt runs on {h.host}: cancel it there"
        elif not h.pgid or h.pgid == os.getpgid(0):
            failed[key] = f"pid {h.pid} has no process group of its own"
        elif h.running_here():
            targets[key] = h
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for h in targets.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(h.pgid, sig)
        deadline = time.monotonic() + grace_s
        while any(h.running_here() for h in targets.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        targets = {k: h for k, h in targets.items() if h.running_here()}
        if not targets:
            break
    failed.update(dict.fromkeys(targets, "still running after SIGKILL"))
    return failed
