"""The run contract, in one place: stage states, the status record, exit codes, the error record. Torch-free.

Every stage directory `<root>/<sweep>/<run-id>/<stage>/` holds `status.json`, the stage's record:

    state        one of STATES (below)
    attempts     attempts that started running (the lease's generation numbers the same attempts)
    job_id       the backend's id of the job that runs or ran it; backend, cluster: where it was submitted
    host, pid    where the current or last attempt ran
    submitted_at, started_at, finished_at   wall-clock seconds
    error        why it failed, was cancelled or preempted (None otherwise)
    checkpoint_skips   [{step, reason}] checkpoints that could not be loaded and were skipped on resume
    bad_nodes    [{node, reason, at}] nodes failures named, oldest first; the next attempt avoids them
                 (`extrema.run.bad_nodes`)

States and who writes them:

    pending    the launcher, at submission (not over a stage a live attempt owns)
    running    the attempt that holds the stage's lease (`extrema.run.lease`), when it starts
    preempted  that attempt, after saving a checkpoint at a stop signal (the backend requeues it)
    completed  that attempt, after result.json is written
    failed     that attempt (an error), or the launcher (its job ended without a result, or an upstream failed)
    cancelled  the launcher (the user cancelled, the job vanished, the driver was interrupted)

A terminal state (completed, failed, cancelled) is never overwritten by the launcher's corrections. Whether a
stage is running is decided by its lease, not by status.json alone: `status` shows `running` while a live
attempt holds the lease, whatever the file says, and never while none does.

Exit codes of a stage process (`python -m extrema.entry`, and the Ray backend's driver around it): EXIT_OK,
EXIT_FAILED, EXIT_USAGE, EXIT_REQUEUE, EXIT_LEASE_LOST, EXIT_UPSTREAM_FAILED, EXIT_INTERRUPTED.

Reading a record (`read_record`, `parse_record`): a regular file of at most MAX_RECORD_BYTES (a named pipe or a
device is not read; with `inside`, one whose real path leaves that directory is refused), nested at most
MAX_DEPTH deep (counted on the bytes before parsing), its numbers finite and of at most MAX_INT_DIGITS digits, and
its fields of the types and ranges of its schema (`StatusRecord`, `ProvenanceRecord`; a result's metrics are
free fields). Anything else is `Unreadable`, naming the file and why, never its content. A stage that finds its
own status.json damaged sets it aside (`status.json.damaged-<time>`) and writes a fresh one (`update_status`).
"""

from __future__ import annotations

import errno
import itertools
import json
import math
import operator
import os
import re
import socket
import stat
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from fsspec.implementations.local import LocalFileSystem
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from extrema.run import rundir
from extrema.spec import DEFAULT_COLLECTIVE_TIMEOUT_S


class StageState(StrEnum):
    """The state of a stage, as its status.json says it (the members are the strings written)."""

    PENDING = "pending"
    RUNNING = "running"
    PREEMPTED = "preempted"  # stopped at a signal after a checkpoint, to be requeued
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


STATES = tuple(StageState)
TERMINAL = frozenset({StageState.COMPLETED, StageState.FAILED, StageState.CANCELLED})
IN_FLIGHT = frozenset({StageState.PENDING, StageState.RUNNING, StageState.PREEMPTED})  # preempted: to be requeued

EXIT_OK = 0  # the stage completed (or had completed before this attempt started)
EXIT_FAILED = 1  # the stage failed; status.json says why
EXIT_USAGE = 2  # bad invocation or spec: nothing ran
EXIT_REQUEUE = 3  # a checkpoint was saved after a preemption signal: requeue, it resumes
EXIT_LEASE_LOST = 4  # another attempt owns the stage: this one committed nothing and wrote no status
EXIT_UPSTREAM_FAILED = 5  # a backend's driver found an upstream stage failed or cancelled: nothing ran
EXIT_INTERRUPTED = 130  # Ctrl-C


class Preempted(Exception):
    """Raised by a stage that stopped at a preemption signal after saving a checkpoint (exits EXIT_REQUEUE)."""


# How a backend hands the launcher's network settings to every rank of a stage (extrema.train.dist reads them).
COLLECTIVE_TIMEOUT_ENV = "EXTREMA_COLLECTIVE_TIMEOUT_S"
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
PROVENANCE = "provenance.json"
SPEC = "spec.json"  # the run's spec as the launcher wrote it (the stage reads it)
METRICS = "metrics.jsonl"
CHECKPOINTS = "ckpt"
LOGS = "logs"
TENSORBOARD = "tensorboard"


@dataclass(frozen=True)
class StageDir:
    """A stage's directory in a run store (`<root>/<sweep>/<run>/<stage>`) and the files the contract puts in it."""

    url: str

    @classmethod
    def of(cls, run_dir: str, stage: str) -> StageDir:
        """The directory of `stage` in the run directory `run_dir`."""
        return cls(rundir.join(run_dir, stage))

    @property
    def run_dir(self) -> str:
        """The run directory holding this stage and its siblings."""
        return self.url.rstrip("/").rsplit("/", 1)[0]

    @property
    def stage(self) -> str:
        """The stage's name (its directory's)."""
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    def sibling(self, stage: str) -> StageDir:
        """Another stage of the same run (the pretrain stage a downstream stage reads, for one)."""
        return StageDir.of(self.run_dir, stage)

    def file(self, name: str) -> str:
        """The URL of `name` in this stage directory."""
        return rundir.join(self.url, name)

    @property
    def status(self) -> str:
        """status.json: the stage's state, written by the stage and the launcher."""
        return self.file(STATUS)

    @property
    def result(self) -> str:
        """result.json: the finished stage's numbers."""
        return self.file(RESULT)

    @property
    def provenance(self) -> str:
        """provenance.json: where and with which code the stage ran."""
        return self.file(PROVENANCE)

    @property
    def spec(self) -> str:
        """spec.json: the run's spec."""
        return self.file(SPEC)

    @property
    def metrics(self) -> str:
        """metrics.jsonl: one JSON line per logged step."""
        return self.file(METRICS)

    @property
    def checkpoints(self) -> str:
        """ckpt/: one step-<n> directory per checkpoint."""
        return self.file(CHECKPOINTS)

    @property
    def logs(self) -> str:
        """logs/: one log per attempt."""
        return self.file(LOGS)

    @property
    def tensorboard(self) -> str:
        """tensorboard/: event files, when the spec asks for TensorBoard."""
        return self.file(TENSORBOARD)


MAX_RECORD_BYTES = 1 << 20  # a stage's record (status, result, provenance, lease) larger than this is damaged
MAX_LOG_BYTES = 64 << 20  # of a JSON-lines log read whole (a long pretraining's metrics.jsonl is ~10 MB)
MAX_DEPTH = 100  # nesting levels of a record: sweep values nest up to 64 (launch.inputs.yamlfile), records a few more
MAX_TIME = 1e11  # seconds since the epoch (year 5138): a larger timestamp is damage, not a date
MAX_INT_DIGITS = 19  # digits of an integer of a record (about 64 bits)
LEAVES = "leads outside the run store; refused"


class Unreadable(Exception):
    """A record of the run store that exists but cannot be read: names its path and the reason (never its content).
    `oversize`: refused for its size alone (kept where it is, never set aside as damaged)."""

    def __init__(self, url: str, reason: str, oversize: bool = False) -> None:
        self.url, self.reason, self.oversize = url, reason, oversize
        super().__init__(f"{url}: {reason}")


Seconds = Annotated[float, Field(ge=0, le=MAX_TIME, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0, le=1 << 31)]
Pid = Annotated[int, Field(ge=1, le=(1 << 31) - 1)]  # os.kill takes a C int; 0 would signal our own group


def _state(value: str) -> str:
    if value not in STATES:
        raise ValueError(f"not a stage state ({', '.join(STATES)})")
    return value


State = Annotated[str, AfterValidator(_state)]


class Record(BaseModel):
    """A record of the run store: the fields this code reads are typed and ranged; others are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=True)


class Submitter(Record):
    """Who recorded a submission (`launch.runstore.store.submitter`)."""

    host: str | None = None
    pid: Pid | None = None
    pid_start: str | None = None


class Skip(Record):
    """A checkpoint step skipped on resume, and why."""

    step: Count | None = None
    reason: str | None = None


class BadNode(Record):
    """A node a failure named, why and when (`extrema.run.bad_nodes`)."""

    node: str
    reason: str | None = None
    at: Seconds | None = None


class StatusRecord(Record):
    """`status.json`: the fields of the module docstring."""

    state: State | None = None
    attempts: Count | None = None
    job_id: str | None = None
    backend: str | None = None
    cluster: str | None = None
    host: str | None = None
    hosts: list[str] | None = None
    pid: Pid | None = None
    lease_generation: Count | None = None
    submitted_at: Seconds | None = None
    started_at: Seconds | None = None
    finished_at: Seconds | None = None
    submitted_by: Submitter | None = None
    submitted_code: str | None = None
    code: str | None = None
    error: str | None = None
    replaced_damaged: str | None = None
    checkpoint_skips: list[Skip] | None = None
    bad_nodes: list[BadNode] | None = None


class Rank(Record):
    """One rank of a stage's world."""

    rank: Count
    host: str
    pid: Pid | None = None


class ProvenanceRecord(Record):
    """`provenance.json`: where a stage ran and with which code (`extrema.run.provenance.provenance`)."""

    git_sha: str | None = None
    git_dirty: bool | None = None
    host: str | None = None
    hosts: list[str] | None = None
    pid: Pid | None = None
    world_size: Annotated[int, Field(ge=1, le=1 << 20)] | None = None
    ranks: list[Rank] | None = None
    code: str | None = None
    code_source: str | None = None


SCHEMAS: dict[str, type[Record]] = {STATUS: StatusRecord, PROVENANCE: ProvenanceRecord}


def schema_of(url: str) -> type[Record] | None:
    """The schema of a stage record by its name; None: any object (a result's metrics are free fields; a lease
    record is checked by `extrema.run.lease`)."""
    return SCHEMAS.get(url.rstrip("/").rsplit("/", 1)[-1])


def checked(url: str, doc: dict[str, Any], schema: type[Record] | None) -> dict[str, Any]:
    """`doc` itself when it fits `schema`; Unreadable naming the first wrong field (never its value) otherwise."""
    if schema is None:
        return doc
    try:
        schema.model_validate(doc)
    except ValidationError as e:
        first = e.errors(include_url=False, include_input=False, include_context=False)[0]
        where = ".".join(_shown(p) for p in first["loc"])
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise Unreadable(url, f"field {where}: {first['msg'][:200]}{more}") from None
    return doc


def _shown(part: str | int) -> str:
    """A location part of a validation error: field names and indices; a record's own keys are not shown."""
    return str(part) if isinstance(part, int) or re.fullmatch(r"[a-z_]{1,40}", part) else "[key]"


_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")  # an opening bracket steps in (2 - 1), a closing one out
_NOT_BRACKET = bytes(sorted(set(range(256)) - set(b"[]{}")))


def depth(data: bytes) -> int:
    """How deep a JSON text nests, from its bytes: strings dropped, then the deepest running count of brackets
    (what a parser would recurse into before it found any error)."""
    steps = _STRING.sub(b"", data).translate(_STEPS, _NOT_BRACKET)
    return max(itertools.accumulate(map(operator.sub, steps, itertools.repeat(1))), default=0)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError("a number out of range")
    return value


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError("an integer out of range")
    return int(text)


def _constant(text: str) -> Any:
    raise ValueError(f"{text} is not a number JSON allows")


_DECODER = json.JSONDecoder(parse_float=_finite, parse_int=_integer, parse_constant=_constant)


def parse_json(url: str, data: bytes, limit: int = MAX_RECORD_BYTES) -> Any:
    """A JSON value from the bytes of a record, bounded in size and depth, its numbers finite and 64-bit integers;
    Unreadable naming why not."""
    if len(data) > limit:
        raise Unreadable(url, f"more than the {limit:,} bytes a record may hold", oversize=True)
    if not data.strip():
        raise Unreadable(url, "empty file")
    if data.count(b"[") + data.count(b"{") > MAX_DEPTH and depth(data) > MAX_DEPTH:
        raise Unreadable(url, f"nested more than {MAX_DEPTH} levels deep")
    try:
        return _DECODER.decode(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise Unreadable(url, f"not JSON (not UTF-8 text at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise Unreadable(url, f"not JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except (ValueError, RecursionError) as e:
        raise Unreadable(url, f"not JSON ({e})" if isinstance(e, ValueError) else "nested too deep") from None


def parse_record(
    url: str, data: bytes, limit: int = MAX_RECORD_BYTES, schema: type[Record] | None = None
) -> dict[str, Any]:
    """A JSON object from the bytes of a record, checked against `schema` (by default the one its name calls for);
    Unreadable when it is too large, too deep, not JSON, not an object, or a field is of the wrong type or range."""
    obj = parse_json(url, data, limit)
    if not isinstance(obj, dict):
        raise Unreadable(url, f"not a JSON object but {type(obj).__name__}")
    return checked(url, obj, schema or schema_of(url))


def within(real: str, tree: str) -> bool:
    """Whether a real (resolved) local path is the real directory `tree` or lies under it."""
    return real == tree or real.startswith(tree.rstrip("/") + "/")


def _opened_path(fd: int, path: str) -> str:
    """The real path of an open file: what the kernel opened (no race with a link swapped meanwhile) on Linux."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return os.path.realpath(path)


def read_local(url: str, path: str, limit: int, inside: str | None = None, tail: bool = False) -> bytes | None:
    """`read_bytes` of a file on this machine, `path` being the URL's local path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Unreadable(url, os_reason(e, path=False)) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise Unreadable(url, "is a directory")
        if not stat.S_ISREG(mode):
            raise Unreadable(url, "not a regular file")
        if inside is not None and not within(_opened_path(fd, path), inside):
            raise Unreadable(url, LEAVES)
        if tail:
            os.lseek(fd, max(0, os.fstat(fd).st_size - limit), os.SEEK_SET)
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(limit + 1 - size, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise Unreadable(url, os_reason(e, path=False)) from None
    finally:
        os.close(fd)


def read_bytes(url: str, limit: int = MAX_RECORD_BYTES, inside: str | None = None, tail: bool = False) -> bytes | None:
    """At most `limit` + 1 bytes of a file of the run store (`tail`: its last `limit` bytes); None when absent.
    Unreadable when it is not a regular file, cannot be read, or (`inside`: a real local directory) its real path
    leaves that tree."""
    fs, path = rundir.filesystem(url)
    if isinstance(fs, LocalFileSystem):
        return read_local(url, path, limit, inside, tail)

    def head_or_tail(f: Any) -> bytes:
        if tail:
            f.seek(max(0, f.size - limit))
        data: bytes = f.read(limit + 1)
        return data

    try:
        return rundir.read_stable(fs, path, "rb", head_or_tail)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Unreadable(url, os_reason(e, path=False)) from None


def read_record(
    url: str, limit: int = MAX_RECORD_BYTES, inside: str | None = None, schema: type[Record] | None = None
) -> dict[str, Any] | None:
    """A JSON-object record of the run store (see `parse_record`); None when absent, Unreadable when damaged."""
    data = read_bytes(url, limit, inside)
    return None if data is None else parse_record(url, data, limit, schema)


def read_lines(
    url: str, limit: int = MAX_LOG_BYTES, inside: str | None = None, tail: bool = False
) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (a stage's metrics.jsonl), its first (`tail`: last) `limit` bytes;
    lines that are not a JSON object within the bounds of `parse_json` (one cut by a crash) are skipped. [] when
    absent; Unreadable when the file cannot be read (see `read_bytes`)."""
    data = read_bytes(url, limit, inside, tail) or b""
    lines = data.split(b"\n")
    if tail and len(data) >= limit:
        lines = lines[1:]  # read from the middle of a line
    elif len(data) > limit:
        lines = lines[:-1]  # cut at the limit
    out = []
    for line in lines:
        try:
            obj = parse_json(url, line)
        except Unreadable:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def read_status(stage_dir: str) -> dict[str, Any]:
    """A stage's status.json ({} when absent); Unreadable when damaged or of the wrong shape."""
    return read_record(rundir.join(stage_dir, STATUS)) or {}


def set_aside(url: str) -> str | None:
    """Move a damaged record out of the way, to `<name>.damaged-<time>` beside it; the new URL, or None when the
    store does not let it be moved."""
    fs, path = rundir.filesystem(url)
    aside = f"{path}.damaged-{int(time.time())}-{uuid.uuid4().hex[:6]}"
    try:
        fs.mv(path, aside)
    except OSError:
        return None
    return aside


def update_status(stage_dir: str, **fields: Any) -> dict[str, Any]:
    """Merge fields into `<stage_dir>/status.json` (atomic write) and return the new record.

    A damaged record is set aside (`status.json.damaged-<time>`) and replaced, its damage noted in
    `replaced_damaged`, so a stage can always say what it is doing.
    """
    url = rundir.join(stage_dir, STATUS)
    try:
        status = read_record(url) or {}
    except Unreadable as e:
        status = {"replaced_damaged": e.reason}
        set_aside(url)
    status.update(fields)
    rundir.write_json(url, status)
    return status


def os_reason(e: OSError, path: bool = True) -> str:
    """An OSError as a reason a person can act on: 'no space left on device' first, then the path (unless the
    caller names it already)."""
    what = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.ELOOP: "symbolic link loop",
        errno.EISDIR: "is a directory",
        errno.EACCES: "permission denied",
    }.get(e.errno or -1) or (e.strerror or type(e).__name__)
    where = e.filename if path and e.filename else ""
    return f"{what}: {where}" if where else what


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
