"""The stage lease: one attempt at a time owns a stage directory, on a shared filesystem or an object store.

`<stage>/lease/<generation>.json` (generation 1, 2, ...) is created exclusively (a hard link on local and shared
POSIX filesystems, `open(mode="xb")` elsewhere: S3 conditional writes, GCS generation preconditions). The owner
of a stage is the attempt that created the highest generation, until it is *free*:

- released: the owner ended and said so (with its outcome);
- dead: the owner ran on this host and its process (pid and start time) is gone;
- expired: its heartbeat is older than the TTL (a lost node, a frozen process, a cut link).

Taking a stage over is creating the next generation exclusively, so of two attempts racing for a free stage
exactly one wins, and nothing is ever deleted to take over. A heartbeat thread rewrites the owner's record every
`heartbeat_s`. Fencing: before committing anything (a checkpoint's `.metadata`, result.json, status.json) the
owner calls `fence()`, which fails unless its generation is still the highest and its own last heartbeat is
younger than the TTL minus a margin; so an attempt that lost its lease (frozen past the TTL, cut off from the
store) can never commit. TTL and heartbeat come from EXTREMA_LEASE_TTL_S (120) and EXTREMA_LEASE_HEARTBEAT_S
(TTL / 8); clocks of hosts sharing a store must agree to well within the TTL.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from extrema import rundir
from extrema.contract import Unreadable, env_float, parse_record

LEASE_DIR = "lease"
_GEN = re.compile(r"^(\d{1,12})\.json$")


class LeaseLost(Exception):
    """This attempt no longer owns its stage: another attempt took it over, or its heartbeat expired."""


def ttl_s() -> float:
    """Seconds after its last heartbeat at which a lease is expired."""
    return env_float("EXTREMA_LEASE_TTL_S", 120.0)


def heartbeat_s() -> float:
    """Seconds between heartbeats."""
    return env_float("EXTREMA_LEASE_HEARTBEAT_S", ttl_s() / 8)


def process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, from /proc), to tell a live pid from a reused one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int, start: str | None) -> bool:
    """Whether process `pid` of this host lives and is the same process (same start time) as recorded."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_start(pid)
    if now is None:  # no /proc here: the pid's existence is all there is
        return True
    return start is None or now == start


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().decode(errors="replace").rsplit(")", 1)[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


@dataclass(frozen=True)
class Holder:
    """What a lease record says about its attempt."""

    generation: int
    record: dict[str, Any]

    @property
    def host(self) -> str:
        return str(self.record.get("host", ""))

    @property
    def pid(self) -> int:
        return int(self.record.get("pid") or 0)

    @property
    def pgid(self) -> int:
        return int(self.record.get("pgid") or 0)

    def why_free(self, now: float | None = None) -> str | None:
        """Why this holder no longer owns the stage (released, dead, expired), or None while it does."""
        r = self.record
        if r.get("released"):
            return f"released ({r.get('outcome') or 'ended'})"
        here = self.host == socket.gethostname() and self.pid
        if here and (not process_alive(self.pid, r.get("pid_start")) or _zombie(self.pid)):
            return f"owner pid {self.pid} on {self.host} is gone"
        beat = r.get("heartbeat_at")
        age = (now or time.time()) - float(beat) if isinstance(beat, (int, float)) else float("inf")
        if age > ttl_s():
            return f"heartbeat {age:.0f} s old (ttl {ttl_s():.0f} s)"
        return None

    def running_here(self) -> bool:
        """Whether the attempt's process runs on this host now (alive, not a zombie, not a reused pid)."""
        if self.host != socket.gethostname() or not self.pid:
            return False
        return process_alive(self.pid, self.record.get("pid_start")) and not _zombie(self.pid)

    def describe(self) -> str:
        """`attempt N: pid P on HOST`."""
        return f"generation {self.generation}: pid {self.pid} on {self.host}"


def lease_dir(stage_dir: str) -> str:
    """`<stage>/lease`."""
    return rundir.join(stage_dir, LEASE_DIR)


def generations(stage_dir: str) -> list[int]:
    """The lease generations present, ascending."""
    fs, path = rundir.filesystem(lease_dir(stage_dir))
    try:
        names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(m.group(1)) for n in names if (m := _GEN.match(n)))


def _gen_url(stage_dir: str, gen: int) -> str:
    return rundir.join(lease_dir(stage_dir), f"{gen:08d}.json")


def read_holder(stage_dir: str, gen: int) -> Holder:
    """The record of one generation; a damaged one counts as expired (heartbeat unknown)."""
    url = _gen_url(stage_dir, gen)
    fs, path = rundir.filesystem(url)
    try:
        record = parse_record(url, fs.cat_file(path))
    except (OSError, Unreadable):
        record = {}
    return Holder(gen, record)


def current(stage_dir: str) -> Holder | None:
    """The holder of the highest generation (live or not), or None when the stage was never leased."""
    gens = generations(stage_dir)
    return read_holder(stage_dir, gens[-1]) if gens else None


def live_holder(stage_dir: str) -> Holder | None:
    """The attempt that owns the stage now, or None when it is free."""
    holder = current(stage_dir)
    return holder if holder is not None and holder.why_free() is None else None


def create_exclusive(url: str, data: bytes) -> bool:
    """Create a file with its whole content only if nothing exists there; False when something does."""
    fs, path = rundir.filesystem(url)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic and exclusive, on local disks and NFS alike
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    try:
        with fs.open(path, "xb") as f:
            f.write(data)
        return True
    except FileExistsError:
        return False


@dataclass
class Lease:
    """This process's ownership of a stage directory (one generation), kept alive by a heartbeat thread."""

    stage_dir: str
    generation: int
    record: dict[str, Any]
    renewed: float = field(default_factory=time.monotonic)
    lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return _gen_url(self.stage_dir, self.generation)

    def start_heartbeat(self) -> None:
        """Renew the lease every heartbeat_s in a daemon thread until released or lost."""
        self._thread = threading.Thread(target=self._beat, name="extrema-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_s()):
            try:
                self.renew()
            except LeaseLost:
                return
            except Exception as e:  # the store is unreachable for now; fence() refuses once the TTL has passed
                print(f"extrema.lease: heartbeat failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def renew(self) -> None:
        """Write a fresh heartbeat, unless another attempt has taken the stage over (then LeaseLost)."""
        self.check_superseded()
        began = time.monotonic()
        self.record["heartbeat_at"] = time.time()
        rundir.write_json(self.url, self.record)
        self.renewed = began

    def check_superseded(self) -> None:
        """LeaseLost when a later generation exists or this generation's record is no longer ours."""
        if self.lost:
            raise LeaseLost(self.lost)
        top = generations(self.stage_dir)
        if not top or top[-1] != self.generation:
            self.lost = f"stage {self.stage_dir} was taken over (generation {top[-1] if top else None} is current)"
            raise LeaseLost(self.lost)
        mine = read_holder(self.stage_dir, self.generation).record
        if mine and mine.get("token") != self.record["token"]:
            self.lost = f"lease generation {self.generation} of {self.stage_dir} was rewritten by another attempt"
            raise LeaseLost(self.lost)

    def fence(self, what: str) -> None:
        """Raise LeaseLost unless this attempt still owns the stage, safely within its TTL; call before commits."""
        age = time.monotonic() - self.renewed
        if age > ttl_s() * 0.75:
            try:  # a long step without the thread getting through: renew in line if the store answers
                self.renew()
            except LeaseLost:
                raise
            except Exception as e:
                raise LeaseLost(f"cannot renew the lease before {what}: {type(e).__name__}: {e}") from None
        self.check_superseded()

    def release(self, outcome: str) -> None:
        """Mark the lease released with the attempt's outcome, so that the next attempt need not wait the TTL."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.lost:
            return
        with contextlib.suppress(Exception):
            self.check_superseded()
            self.record.update(released=True, outcome=outcome, released_at=time.time())
            rundir.write_json(self.url, self.record)


def my_record(attempt: int, job_id: str | None) -> dict[str, Any]:
    """What this process writes into its lease generation."""
    pid = os.getpid()
    return {
        "token": uuid.uuid4().hex,
        "host": socket.gethostname(),
        "pid": pid,
        "pgid": os.getpgid(pid),
        "pid_start": process_start(pid),
        "attempt": attempt,
        "job_id": job_id,
        "acquired_at": time.time(),
        "heartbeat_at": time.time(),
        "released": False,
    }


def try_acquire(stage_dir: str, job_id: str | None = None) -> Lease | Holder:
    """Take the stage if it is free (a new generation); else the live holder that owns it."""
    while True:
        holder = current(stage_dir)
        if holder is not None and holder.why_free() is None:
            return holder
        gen = (holder.generation if holder else 0) + 1
        record = my_record(gen, job_id)
        if create_exclusive(_gen_url(stage_dir, gen), (json.dumps(record, indent=2) + "\n").encode()):
            lease = Lease(stage_dir, gen, record)
            _prune(stage_dir, gen)
            return lease
        # another attempt created that generation first: look again at who owns the stage now


def acquire(stage_dir: str, job_id: str | None = None, wait: bool = True, poll_s: float = 1.0) -> Lease | Holder:
    """Take the stage, waiting while a live attempt owns it (when `wait`); the lease, or the live holder."""
    while True:
        got = try_acquire(stage_dir, job_id)
        if isinstance(got, Lease) or not wait:
            return got
        time.sleep(poll_s)


def _prune(stage_dir: str, gen: int) -> None:
    """Remove generations older than the previous one (kept for the record of who ran before)."""
    fs, _ = rundir.filesystem(stage_dir)
    for old in generations(stage_dir):
        if old < gen - 1:
            with contextlib.suppress(Exception):
                fs.rm(rundir.filesystem(_gen_url(stage_dir, old))[1])


_current: Lease | None = None


def hold(lease: Lease | None) -> None:
    """Make `lease` the one this process's commits are fenced by (None: no fencing, e.g. tests and tools)."""
    global _current
    _current = lease


def fence(what: str) -> None:
    """Raise LeaseLost unless this process's attempt still owns its stage (no-op when it holds no lease)."""
    if _current is not None:
        _current.fence(what)


def release_held(outcome: str) -> None:
    """Release this process's lease, if it holds one, with the attempt's outcome, and stop fencing by it."""
    global _current
    held, _current = _current, None
    if held is not None:
        held.release(outcome)
