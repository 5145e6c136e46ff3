"""The local backend: stage jobs as subprocesses of this process, in dependency order, within a CPU/GPU budget.

Jobs start when the caller polls (`status`); `extrema-launch sweep` polls until every job has ended. A ready job
starts when fewer than `max_parallel` jobs run and its CPUs (cpus_per_task x processes_per_node) fit beside the
running ones in this machine's CPUs (a job larger than the machine runs alone), and its GPUs (gpus_per_node) are
free: those GPUs are its own, pinned with CUDA_VISIBLE_DEVICES. A spec that sets cpus_per_task gets that many intra-op
threads per process (OMP_NUM_THREADS, unless already set); without it, when `max_parallel` jobs may run side by side,
each process gets its share of the machine's CPUs (CPUs / (max_parallel x processes), at least one). A job asking
more GPUs than the machine has fails at once with the reason. Jobs asking no GPUs are not pinned (they see what
this process sees). A job of several processes forks its ranks from one process (`Job.command`: `extrema.entry
--processes N`).

Each job's stdout and stderr go, interleaved, to a log of its own, `<run-dir>/<stage>/logs/local.<n>.log` (n = 1,
2, ... in the order the attempts started; created exclusively, never overwritten; its first line names the job, host
and command). On an object store the log is written to a local file and uploaded while the job runs (at each
poll, when it grew and `log_upload_s` passed, that interval stretched to a second per MiB of log, so that a large
log is not sent over and over) and when it ends: a driver killed mid-job leaves the log as last uploaded. A job that
exits with 2 (bad invocation, a refused code snapshot) is recorded failed with the last line it printed. A job
whose upstream failed is not run and is recorded as failed ("not run: upstream ..."). `cancel` sends SIGTERM to the
job's process group, waits `grace_s`, then SIGKILL, and records the stage as cancelled so that the next `sweep`
resumes it. A stage marked cancelled in the run store by another process (`extrema-launch cancel`) is stopped at
the next poll. Job ids are `local-<pid>-<n>@<host>`.

`stop_attempts` (`extrema-launch cancel`) stops attempts another process started, named by their lease records,
but signals a process group only when it can prove it is the stage's attempt (`why_not_the_attempt`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Self

from fsspec.implementations.local import LocalFileSystem
from pydantic import model_validator

from extrema.run import contract, lease, rundir
from extrema.run.contract import StageDir, StageState
from extrema.spec import located
from launch.backends.base import Backend, Job, LauncherSettings, State, code_env
from launch.runstore import store

LOG_PREFIX = "local"  # logs/local.<n>.log, one per attempt (launch.logs reads them in order)
_LOG = re.compile(r"local\.(\d{1,9})\.log")
LAST_LINE_BYTES = 4096
LOG_UPLOAD_S = 30.0  # at most this often a running job's log goes to an object store (see the module docstring)
LOG_UPLOAD_BYTES_PER_S = 1 << 20
_ID = re.compile(r"local-(\d+)-(\d+)@(.+)")
_ENDED = (State.COMPLETED, State.FAILED, State.CANCELLED)


def side_by_side_threads(cpus: int, max_parallel: int, processes: int) -> int | None:
    """Intra-op threads per process of a job whose spec sets no cpus_per_task: this machine's CPUs split among the
    processes of `max_parallel` jobs running side by side (at least one); None while one job runs at a time (it
    has the machine)."""
    if max_parallel <= 1:
        return None
    return max(1, cpus // (max_parallel * processes))


def job_env(
    job: Job, job_id: str, gpus: tuple[str, ...], base: Mapping[str, str], share: int | None = None
) -> dict[str, str]:
    """The environment a local job starts with: `base` plus its job id, network settings, GPUs and CPU threads
    (cpus_per_task when the spec sets it, else `share`, else what the job finds)."""
    env = {**base, **job.env(), "EXTREMA_JOB_ID": job_id, "PYTHONUNBUFFERED": "1"}
    if job.code_dir:
        env.update(code_env(job.code_dir, base.get("PYTHONPATH")))
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    r = job.resources
    if "cpus_per_task" in r.model_fields_set:
        # One intra-op thread per granted CPU: jobs sharing the cores otherwise oversubscribe them several-fold.
        env.setdefault("OMP_NUM_THREADS", str(min(r.cpus_per_task, os.cpu_count() or 1)))
    elif share is not None:
        # Jobs running side by side split the cores: each taking every core, their OpenMP threads spin at barriers
        # for cores the other job holds (two demo-sized pretraining jobs on 2 cores ran 3.6x slower so:
        # 33 against 118-125 images/s).
        env.setdefault("OMP_NUM_THREADS", str(share))
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
    uploaded: tuple[float, int] = (0.0, -1)  # (when, size) of the last upload of the running job's log
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


class LocalSettings(LauncherSettings):
    """A local sweep's stages run on this machine only; `launcher.max_parallel` of them at once (1 unless set)."""

    @model_validator(mode="after")
    def _one_machine(self) -> Self:
        for label, res in [("resources", self.resources), *((f"stages.{k}", v) for k, v in self.stages.items())]:
            if self.backend == LocalBackend.name and res.nodes > 1:
                raise located(f"{label}.nodes", "the local backend runs on this machine only (nodes: 1)")
        return self


class LocalBackend(Backend):
    """Runs stage jobs as local subprocesses (no shell), in dependency order, within `max_parallel`, CPUs and GPUs."""

    name = "local"
    adopts_running = True  # a job for a stage a live attempt owns waits on its lease (extrema.run.lease)
    runs_here = True

    def __init__(
        self,
        max_parallel: int = 1,
        grace_s: float = 10.0,
        cpus: int | None = None,
        gpus: Sequence[str] | None = None,
        log_upload_s: float = LOG_UPLOAD_S,
    ) -> None:
        if max_parallel < 1:
            raise ValueError("max_parallel must be at least 1")
        self.max_parallel = max_parallel
        self.cpus = cpus if cpus is not None else machine_cpus()
        self.gpus = tuple(gpus) if gpus is not None else machine_gpus()
        self.grace_s = grace_s
        self.log_upload_s = log_upload_s
        self.host = socket.gethostname()
        self._tasks: dict[str, _Task] = {}
        self._by_key: dict[str, str] = {}
        self._counter = itertools.count()

    @classmethod
    def from_launcher(cls, launcher: LauncherSettings, address: str | None = None) -> LocalBackend:
        """The backend a sweep's launcher section asks for (this machine: no address)."""
        return cls(max_parallel=LocalSettings.of(launcher).max_parallel or 1)

    @classmethod
    def stop_attempts(cls, sweep_url: str, holders: Mapping[str, lease.Holder]) -> dict[str, str]:
        """Stop the local stage processes that own these stages (see the module's `stop_attempts`)."""
        return stop_attempts(sweep_url, holders)

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
        """Advance the queue (reap, start) and report each job's state; ELSEWHERE for jobs of other hosts."""
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
            elif t.state == State.RUNNING and t.upload_to:
                self._upload_running_log(t)
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

    def share(self, job: Job) -> int | None:
        """Intra-op threads per process of `job` when its spec sets no cpus_per_task (`side_by_side_threads`)."""
        return side_by_side_threads(self.cpus, self.max_parallel, job.resources.processes_per_node)

    def _cancelled_in_store(self, t: _Task) -> bool:
        status = store.read_status(t.stage_dir)
        return status.get("state") == StageState.CANCELLED and float(status.get("finished_at") or 0) >= t.submitted

    def _foreign(self, job_id: str) -> State | None:
        """A job of another process: gone with its process when that ran on this host. None while that process
        lives (its job may be queued or running: the run store tells which); ELSEWHERE when it ran on another host
        (whose sweep may be gone: `sweep` follows such a stage, its lease keeps it to one attempt)."""
        m = _ID.fullmatch(job_id)
        if not m:
            return State.UNKNOWN
        if m.group(3) != self.host:
            return State.ELSEWHERE
        if lease.process_alive(int(m.group(1)), None):
            return None
        return State.CANCELLED

    def _start(self, t: _Task) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        header = f"=== {stamp} job {t.job_id} on {self.host}: {' '.join(t.job.command())}\n".encode()
        try:
            self._open_log(t, header)
        except OSError as e:  # this stage's directory takes no writes: that stage fails, named; the others go on
            self._end(t, State.FAILED, f"cannot write its log: {contract.os_reason(e)}", write=True)
            return
        t.proc = subprocess.Popen(
            t.job.command(),
            stdin=subprocess.DEVNULL,
            stdout=t.log,
            stderr=subprocess.STDOUT,
            env=job_env(t.job, t.job_id, t.gpus, os.environ, self.share(t.job)),
            start_new_session=True,
        )
        t.started = time.time()
        t.state = State.RUNNING

    def _open_log(self, t: _Task, header: bytes) -> None:
        url = new_log(t.stage_dir, header)
        fs, path = rundir.filesystem(url)
        if isinstance(fs, LocalFileSystem):
            t.log_path = path
        else:
            fd, t.log_path = tempfile.mkstemp(prefix="extrema-", suffix=".log")
            with os.fdopen(fd, "wb") as f:
                f.write(header)
            t.upload_to = url
        t.log = open(t.log_path, "ab")  # noqa: SIM115 - closed when the job is reaped

    def _upload_running_log(self, t: _Task) -> None:
        """Send a running job's log to the object store when it grew and its interval passed (best effort: a
        refused upload is tried again at a later poll, and the log is uploaded when the job ends)."""
        try:
            size = os.path.getsize(t.log_path)
        except OSError:
            return
        when, sent = t.uploaded
        now = time.time()
        if size == sent or now < when + max(self.log_upload_s, size / LOG_UPLOAD_BYTES_PER_S):
            return
        t.uploaded = (now, size)
        assert t.upload_to is not None
        with contextlib.suppress(OSError):
            fs, path = rundir.filesystem(t.upload_to)
            fs.put_file(t.log_path, path)

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
        if stored == StageState.CANCELLED or t.returncode == contract.EXIT_REQUEUE:
            self._end(t, State.CANCELLED, "stopped at a signal (checkpoint saved); `sweep` resumes it", write=True)
            return
        error = f"exit code {t.returncode}"
        if t.returncode == contract.EXIT_USAGE:  # refused before it ran: what it said is the reason
            error = f"{last_line(t.log_path)} ({error})"
        self._end(t, State.FAILED, error, write=True)

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
                try:
                    fs, path = rundir.filesystem(t.upload_to)
                    fs.put_file(t.log_path, path)
                    os.unlink(t.log_path)
                except OSError as e:  # the log stays on this machine; the job's end is recorded all the same
                    print(f"extrema: {t.job.key}: log kept at {t.log_path}: {contract.os_reason(e)}", file=sys.stderr)
        if write or (write is None and state != State.COMPLETED):
            store.mark_ended(t.stage_dir, StageState(state.value), error)


def new_log(stage_dir: str, header: bytes) -> str:
    """The URL of a new attempt log of the stage, `logs/local.<n>.log` after the highest n there, created
    exclusively with its header line (two jobs starting at once get two logs)."""
    logs = StageDir(stage_dir).logs
    fs, path = rundir.filesystem(logs)
    try:
        names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        names = []
    n = max((int(m.group(1)) for name in names if (m := _LOG.fullmatch(name))), default=0)
    while True:
        n += 1
        url = rundir.join(logs, f"{LOG_PREFIX}.{n}.log")
        if lease.create_exclusive(url, header):
            return url


def last_line(path: str) -> str:
    """The last line a job printed (from the end of its log), to say why it stopped."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - LAST_LINE_BYTES))
            tail = f.read().decode(errors="replace")
    except OSError:
        return "(its log cannot be read)"
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    return lines[-1][-500:] if lines else "(it printed nothing)"


def proc_argv(pid: int) -> list[str] | None:
    """The command line of a process of this host, or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(1 << 20)
    except OSError:
        return None
    return [a.decode(errors="surrogateescape") for a in raw.split(b"\0")[:-1]] if raw else None


def parent(pid: int) -> int:
    """The parent pid of a process of this host (0 when unknown)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().decode(errors="replace").rsplit(")", 1)[-1].split()  # state, ppid, pgrp, ...
    except OSError:
        return 0
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else 0


def protected() -> set[int]:
    """Pids and process groups never to signal: this process, its ancestors, and their process groups."""
    out: set[int] = set()
    pid = os.getpid()
    while pid > 0 and pid not in out:
        out.add(pid)
        with contextlib.suppress(OSError):
            out.add(os.getpgid(pid))
        pid = parent(pid)
    return out | {0, 1}


def place(url: str, cwd: str | None) -> str | None:
    """A run directory in one spelling: the real path of a local one (a relative one taken from `cwd`), else the URL
    as its filesystem spells it; None when it cannot be told."""
    try:
        if "://" not in url:
            if not os.path.isabs(url):
                return os.path.realpath(os.path.join(cwd, url)) if cwd else None
            return os.path.realpath(url)
        fs, path = rundir.filesystem(url)
        if isinstance(fs, LocalFileSystem):
            return os.path.realpath(path)
        return str(fs.unstrip_protocol(path)).rstrip("/")
    except Exception:  # a command line that is not a URL fsspec knows
        return None


def runs_stage(argv: list[str], pid: int, run_dir: str, stage: str) -> bool:
    """Whether a command line is `extrema.entry <run_dir> <stage>` as this backend starts it (`Job.command`):
    `python [-u] -m extrema.entry [--processes=N]` (the forked ranks show their parent's), or the torchrun that
    runs it (`python -m torch.distributed.run --...`)."""
    if len(argv) < 5 or argv[-1] != stage:
        return False
    head = argv[1:-2]
    if head and re.fullmatch(r"--processes=[0-9]+", head[-1]):
        head = head[:-1]
    if head[-2:] != ["-m", "extrema.entry"]:
        return False
    middle = head[:-2]
    torchrun = middle[:2] == ["-m", "torch.distributed.run"] and all(a.startswith("--") for a in middle[2:])
    if middle not in ([], ["-u"]) and not torchrun:
        return False
    try:
        cwd: str | None = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        cwd = None
    there = place(argv[-2], cwd)
    return there is not None and there == place(run_dir, os.getcwd())


def why_not_the_attempt(h: lease.Holder, run_dir: str, stage: str) -> str | None:
    """Why the process group a lease record names cannot be proven to be this stage's local attempt, or None when
    it is: its pid is not 1, this process or an ancestor (nor their groups), it started when the record says, it
    runs `extrema.entry <run_dir> <stage>`, and its group is its own or that of the entry (or torchrun) that started
    it."""
    pid, pgid = h.pid, h.pgid
    if pid <= 1 or pgid <= 1:
        return f"the record names pid {pid}, process group {pgid}"
    if pid in protected() or pgid in protected():
        return f"the record names pid {pid}, process group {pgid}: this cancel's own process group or an ancestor"
    recorded, started = h.record.get("pid_start"), lease.process_start(pid)
    if recorded is None or started is None or str(recorded) != started:
        return f"pid {pid} is not the process the record names (it started at {started}, the record says {recorded})"
    argv = proc_argv(pid)
    if argv is None or not runs_stage(argv, pid, run_dir, stage):
        shown = shlex.join(argv)[:300] if argv else "unreadable"
        return f"pid {pid} does not run extrema.entry {run_dir} {stage} (its command line: {shown})"
    try:
        group = os.getpgid(pid)
    except OSError:
        return f"pid {pid} is gone"
    if group != pgid:
        return f"pid {pid} is in process group {group}, not {pgid} as the record says"
    if pgid != pid:
        leader = proc_argv(pgid)
        if parent(pid) != pgid or leader is None or not runs_stage(leader, pgid, run_dir, stage):
            return f"process group {pgid} is led neither by pid {pid} nor by the process that started it"
    return None


def stop_attempts(sweep_url: str, holders: Mapping[str, lease.Holder], grace_s: float = 10.0) -> dict[str, str]:
    """Stop the local stage processes that own these stages of the sweep (by job key), whoever started them:
    SIGTERM to each one's process group, SIGKILL after `grace_s`, each signal only after `why_not_the_attempt`
    proved again that the group is the stage's attempt. Attempts of other backends are left to them. Returns
    key -> why an attempt was not stopped."""
    failed: dict[str, str] = {}
    targets: dict[str, tuple[lease.Holder, str, str]] = {}
    for key, h in holders.items():
        if not _ID.fullmatch(str(h.record.get("job_id") or "")):
            continue
        run_id, stage = store.split_key(key)
        run_dir = store.run_url(sweep_url, run_id)
        if h.host != socket.gethostname():
            failed[key] = f"its local attempt runs on {h.host}: cancel it there"
            continue
        if not h.running_here():
            continue  # its process (as the record names it: pid and start time) is gone: nothing to stop
        why = why_not_the_attempt(h, run_dir, stage)
        if why is not None:
            failed[key] = why
        else:
            targets[key] = (h, run_dir, stage)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for h, run_dir, stage in targets.values():
            if why_not_the_attempt(h, run_dir, stage) is None:  # the pid may have ended and been reused since
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(h.pgid, sig)
        deadline = time.monotonic() + grace_s
        while any(h.running_here() for h, _, _ in targets.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        targets = {k: v for k, v in targets.items() if v[0].running_here()}
        if not targets:
            break
    failed.update(dict.fromkeys(targets, "still running after SIGKILL"))
    return failed
