"""The run contract, in one place: stage states, the status record, exit codes, the error record. Torch-free.

Every stage directory `<root>/<sweep>/<run-id>/<stage>/` holds `status.json`, the stage's record:

    state        one of STATES (below)
    attempts     attempts that started running (the lease's generation numbers the same attempts)
    job_id       the backend's id of the job that runs or ran it; backend, cluster: where it was submitted
    host, pid    where the current or last attempt ran
    submitted_at, started_at, finished_at   wall-clock seconds
    error        why it failed, was cancelled or preempted (None otherwise)
    checkpoint_skips   [{step, reason}] checkpoints that could not be loaded and were skipped on resume

States and who writes them:

    pending    the launcher, at submission (not over a stage a live attempt owns)
    running    the attempt that holds the stage's lease (`extrema.lease`), when it starts
    preempted  that attempt, after saving a checkpoint at a stop signal (the backend requeues it)
    completed  that attempt, after result.json is written
    failed     that attempt (an error), or the launcher (its job ended without a result, or an upstream failed)
    cancelled  the launcher (the user cancelled, the job vanished, the driver was interrupted)

A terminal state (completed, failed, cancelled) is never overwritten by the launcher's corrections. Whether a
stage is running is decided by its lease, not by status.json alone: `status` shows `running` while a live
attempt holds the lease, whatever the file says, and never while none does.

Exit codes of a stage process (`python -m extrema.entry`, and the Ray backend's driver around it): EXIT_OK,
EXIT_FAILED, EXIT_USAGE, EXIT_REQUEUE, EXIT_LEASE_LOST, EXIT_UPSTREAM_FAILED, EXIT_INTERRUPTED.
"""

from __future__ import annotations

import errno
import json
import os
import socket
from typing import Any

from extrema import rundir

PENDING, RUNNING, PREEMPTED = "pending", "running", "preempted"
COMPLETED, FAILED, CANCELLED = "completed", "failed", "cancelled"
STATES = (PENDING, RUNNING, PREEMPTED, COMPLETED, FAILED, CANCELLED)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})
IN_FLIGHT = frozenset({PENDING, RUNNING, PREEMPTED})  # preempted: stopped at a signal, to be requeued

EXIT_OK = 0  # the stage completed (or had completed before this attempt started)
EXIT_FAILED = 1  # the stage failed; status.json says why
EXIT_USAGE = 2  # bad invocation or spec: nothing ran
EXIT_REQUEUE = 3  # a checkpoint was saved after a preemption signal: requeue, it resumes
EXIT_LEASE_LOST = 4  # another attempt owns the stage: this one committed nothing and wrote no status
EXIT_UPSTREAM_FAILED = 5  # a backend's driver found an upstream stage failed or cancelled: nothing ran
EXIT_INTERRUPTED = 130  # Ctrl-C

# How a backend hands the launcher's network settings to every rank of a stage (extrema.dist reads them).
COLLECTIVE_TIMEOUT_ENV = "EXTREMA_COLLECTIVE_TIMEOUT_S"
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
INTERFACE_ENVS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
# NCCL failures raise in the failing rank instead of killing it (2: abort the communicators only; torch's default
# tears the process down, so no failed record would be written), and the flight recorder keeps the last
# collectives of every rank, dumped on a timeout (into the stage directory: extrema.entry names the file).
NCCL_ENV = {
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
    "TORCH_FR_BUFFER_SIZE": "2000",
    "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
}
FLIGHT_RECORDER_DIR = "flight_recorder"  # in a stage directory on a filesystem: NCCL's per-rank dumps

STATUS = "status.json"
RESULT = "result.json"
MAX_RECORD_BYTES = 1 << 20  # a status or result record larger than this is damaged, not read


class Unreadable(Exception):
    """A record of the run store that exists but cannot be read: names its path and the reason."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = url, reason
        super().__init__(f"{url}: {reason}")


def parse_record(url: str, data: bytes) -> dict[str, Any]:
    """A JSON object from the bytes of a record; Unreadable when it is too large, not JSON or not an object."""
    if len(data) > MAX_RECORD_BYTES:
        raise Unreadable(url, f"{len(data)} bytes, more than a record may hold ({MAX_RECORD_BYTES})")
    if not data.strip():
        raise Unreadable(url, "empty file")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Unreadable(url, f"not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise Unreadable(url, f"not a JSON object but {type(obj).__name__}")
    return obj


def read_record(url: str) -> dict[str, Any] | None:
    """A JSON-object record of the run store; None when absent, Unreadable when damaged (a directory, a loop...)."""
    fs, path = rundir.filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            data = f.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Unreadable(url, os_reason(e)) from None
    return parse_record(url, data)


def read_status(stage_dir: str) -> dict[str, Any]:
    """A stage's status.json ({} when absent); Unreadable when damaged."""
    return read_record(rundir.join(stage_dir, STATUS)) or {}


def update_status(stage_dir: str, **fields: Any) -> dict[str, Any]:
    """Merge fields into `<stage_dir>/status.json` (atomic write) and return the new record.

    A damaged record is replaced (its damage is recorded in `replaced_damaged`), so a stage can always say
    what it is doing.
    """
    url = rundir.join(stage_dir, STATUS)
    try:
        status = read_record(url) or {}
    except Unreadable as e:
        status = {"replaced_damaged": e.reason}
    status.update(fields)
    rundir.write_json(url, status)
    return status


def os_reason(e: OSError) -> str:
    """An OSError as a reason a person can act on: 'no space left on device' first, then the path."""
    what = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.ELOOP: "symbolic link loop",
        errno.EISDIR: "is a directory",
        errno.EACCES: "permission denied",
    }.get(e.errno or -1) or (e.strerror or type(e).__name__)
    path = e.filename or ""
    return f"{what}: {path}" if path else what


def chain(exc: BaseException) -> list[BaseException]:
    """An exception with its causes and contexts, and the errors a library collected inside it, outermost first."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or any(e is s for s in seen) or len(seen) > 50:
            continue
        seen.append(e)
        todo += [c for c in (e.__cause__, e.__context__) if c is not None]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException: rank -> error
        if isinstance(failures, dict):
            for v in failures.values():
                inner = v[0] if isinstance(v, tuple) and v else v
                if isinstance(inner, BaseException):
                    todo.append(inner)
        todo += [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
    return seen


def describe_error(exc: BaseException) -> str:
    """One line on why an attempt failed: a full disk (or another OS error) found anywhere in the chain comes
    first with its path, then the exception's own type and message."""
    top = f"{type(exc).__name__}: {str(exc).strip()}".rstrip(": ")
    for e in chain(exc):
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{os_reason(e)} ({top})"[:4000]
    return top[:4000]


def is_full_disk(exc: BaseException) -> bool:
    """Whether a full disk (or quota) is anywhere in the exception's chain."""
    return any(isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) for e in chain(exc))


def collective_timeout_s() -> float:
    """Seconds a rank waits in one collective: the launcher's setting (COLLECTIVE_TIMEOUT_ENV), else the default."""
    return env_float(COLLECTIVE_TIMEOUT_ENV, DEFAULT_COLLECTIVE_TIMEOUT_S)


def this_process(rank: int = 0) -> dict[str, Any]:
    """This process's place in a stage's world: {"rank", "host", "pid"}."""
    return {"rank": rank, "host": socket.gethostname(), "pid": os.getpid()}


def env_float(name: str, default: float) -> float:
    """A positive float from the environment, else `default`."""
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default
