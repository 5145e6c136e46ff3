"""The stage lease: one attempt at a time owns a stage directory, on a shared filesystem or an object store.

`<stage>/lease/<generation>.json` (generation 1, 2, ...) is created exclusively: a hard link on local and shared
POSIX filesystems; on S3 and stores speaking its API a conditional PUT (`If-None-Match: *`, see
`conditional_writes`); `open(mode="xb")` on other stores. The owner of a stage is the attempt that created the
highest generation, until it is *free*:

- released: the owner ended and said so (with its outcome);
- dead: the owner ran on this host and its process (pid and start time) is gone;
- expired: its heartbeat is older than the TTL (a lost node, a frozen process, a cut link), further in the future
  than the clock-skew bound or not a finite time (a wrong clock: warned once per host), or its record is damaged
  (a value of the wrong type or out of range: warned once per file);
- taken over: (S3) a later attempt marked it so.

Taking a stage over is creating the next generation exclusively, so of two attempts racing for a free stage
exactly one wins, and nothing is ever deleted to take over. A lost race re-reads the lease folder (never from a
cached listing) and tries the next free generation, at most RACE_TRIES times with growing, jittered pauses. A
heartbeat thread rewrites the owner's record every `heartbeat_s`. On S3 every rewrite is a compare-and-swap on the
ETag of the owner's last write (`If-Match`), and a taker first marks the free record it read as taken over, on
that record's ETag: a record renewed meanwhile is not taken over, and an owner whose record was taken over fails
its next renewal with LeaseLost.

Fencing: before committing anything (a checkpoint's `.metadata`, result.json, status.json) the owner calls
`Lease.fence` (handed down as a `Fence`: the job entry passes it to the stage, the stage to its checkpoint writer),
which fails unless its generation is still the highest, its record is still the one it wrote, and its
own last heartbeat is younger than 3/4 of the TTL (else it renews first); so an attempt that lost its lease (frozen
past the TTL, cut off from the store) does not commit. A window remains between a fence and the write it guards:
no store offers a write conditional on another object, so a write that takes more than TTL/4 (less the clocks'
disagreement) to land after its fence (a process frozen right after fencing, a request stuck in the network) can
land after a takeover. TTL, heartbeat and skew bound come from EXTREMA_LEASE_TTL_S (120), EXTREMA_LEASE_HEARTBEAT_S
(TTL / 8) and EXTREMA_LEASE_SKEW_S (60); clocks of hosts sharing a store must agree to well within TTL/4.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from extrema.run import conditional_writes, rundir
from extrema.run.contract import MAX_RECORD_BYTES, Unreadable, env_float, parse_record, read_bytes

LEASE_DIR = "lease"
_GEN = re.compile(r"(\d{1,12})\.json")
RACE_TRIES = 8  # exclusive creates one try_acquire makes before it gives up for now (`acquire` tries again)
BACKOFF_S, BACKOFF_CAP_S = 0.05, 2.0  # the pause after the n-th lost race: min(cap, 0.05 * 2**n) times 0.5-1
_NUMBER = (int, float)
_REQUIRED: dict[str, tuple[type, ...]] = {
    "token": (str,),
    "host": (str,),
    "pid": (int,),
    "heartbeat_at": _NUMBER,
    "released": (bool,),
}
_OPTIONAL: dict[str, tuple[type, ...]] = {
    "pgid": (int,),
    "pid_start": (str, type(None)),
    "attempt": (int,),
    "job_id": (str, type(None)),
    "acquired_at": _NUMBER,
    "outcome": (str, type(None)),
    "released_at": _NUMBER,
    "taken_over_by": (int,),
}
_MAX_PID = 1 << 31
_warned: set[str] = set()


# A commit's guard: raises LeaseLost unless this attempt still owns its stage; the argument names the commit.
Fence = Callable[[str], None]


def unfenced(what: str) -> None:
    """The fence of a process that holds no lease (tests, tools): every commit goes ahead."""


class LeaseLost(Exception):
    """This attempt no longer owns its stage: another attempt took it over, or its heartbeat expired."""


def ttl_s() -> float:
    """Seconds after its last heartbeat at which a lease is expired."""
    return env_float("EXTREMA_LEASE_TTL_S", 120.0)


def heartbeat_s() -> float:
    """Seconds between heartbeats."""
    return env_float("EXTREMA_LEASE_HEARTBEAT_S", ttl_s() / 8)


def skew_s() -> float:
    """Seconds a heartbeat may lie in the future (its host's clock ahead of ours) and still count."""
    return env_float("EXTREMA_LEASE_SKEW_S", 60.0)


def _warn_once(key: str, text: str) -> None:
    if key not in _warned:
        _warned.add(key)
        print(f"extrema.run.lease: {text}", file=sys.stderr, flush=True)


def record_damage(record: dict[str, Any]) -> str | None:
    """What is wrong with the values of a lease record (a field missing, of the wrong type, out of range), or None."""
    for name, kinds in {**_REQUIRED, **_OPTIONAL}.items():
        if name not in record:
            if name in _REQUIRED:
                return f"no {name}"
            continue
        value = record[name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            return f"{name} is {type(value).__name__}, not {' or '.join(k.__name__ for k in kinds)}"
    for name in ("pid", "pgid"):
        if not 0 <= record.get(name, 0) < _MAX_PID:
            return f"{name} {record[name]} is out of range"
    for name in ("attempt", "taken_over_by"):
        if record.get(name, 1) < 1:
            return f"{name} {record[name]} is not a generation"
    return None


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
    record: dict[str, Any]  # checked by record_damage; empty when damaged
    url: str = ""
    damage: str | None = None  # why the record is unusable (it then counts as expired)
    etag: str | None = None  # on S3: the ETag of the version read, for a compare-and-swap on it

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
        if self.damage is not None:
            _warn_once(self.url, f"{self.url}: damaged lease record ({self.damage}); counted as expired")
            return f"damaged record ({self.damage})"
        r = self.record
        if r.get("released"):
            return f"released ({r.get('outcome') or 'ended'})"
        if "taken_over_by" in r:
            return f"taken over by generation {r['taken_over_by']}"
        here = self.host == socket.gethostname() and self.pid
        if here and (not process_alive(self.pid, r.get("pid_start")) or _zombie(self.pid)):
            return f"owner pid {self.pid} on {self.host} is gone"
        now = time.time() if now is None else now
        beat = float(r["heartbeat_at"])
        if not math.isfinite(beat):
            why = f"heartbeat {beat} is not a time"
        elif beat - now > skew_s():
            why = f"heartbeat {beat - now:.0f} s in the future, beyond the clock-skew bound of {skew_s():.0f} s"
        else:
            age = now - beat
            return f"heartbeat {age:.0f} s old (ttl {ttl_s():.0f} s)" if age > ttl_s() else None
        _warn_once(
            f"clock {self.host}",
            f"{self.url}: host {self.host!r}: {why} (EXTREMA_LEASE_SKEW_S); counted as expired: check its clock",
        )
        return why

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
    fs.invalidate_cache(path)  # a cached listing would hide a rival's generation forever
    fresh = {"refresh": True} if conditional_writes.speaks_s3(fs) else {}
    try:
        names = [str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False, **fresh)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(int(m.group(1)) for n in names if (m := _GEN.fullmatch(n)))


def _gen_url(stage_dir: str, gen: int) -> str:
    return rundir.join(lease_dir(stage_dir), f"{gen:08d}.json")


def read_holder(stage_dir: str, gen: int) -> Holder:
    """The record of one generation; a damaged one counts as expired. On S3 a record that cannot be read for
    another reason than its absence raises (a flaky link must not look like an expired owner)."""
    url = _gen_url(stage_dir, gen)
    fs, path = rundir.filesystem(url)
    etag = None
    try:
        if conditional_writes.speaks_s3(fs):
            got = conditional_writes.read(fs, path, MAX_RECORD_BYTES + 1)
            if got is None:
                return Holder(gen, {}, url, "gone since it was listed")
            data, etag = got
        else:  # a regular file inside the stage directory, at most a record's size (a pipe or a link out is damage)
            local = rundir.local_path(stage_dir)
            read = read_bytes(url, MAX_RECORD_BYTES, inside=os.path.realpath(local) if local else None)
            if read is None:
                return Holder(gen, {}, url, "gone since it was listed")
            data = read
        record = parse_record(url, data)
    except Unreadable as e:
        return Holder(gen, {}, url, e.reason, etag)
    except OSError as e:
        if conditional_writes.speaks_s3(fs):
            raise
        return Holder(gen, {}, url, f"unreadable: {type(e).__name__}: {e}")
    damage = record_damage(record)
    return Holder(gen, {} if damage else record, url, damage, etag)


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
    if conditional_writes.speaks_s3(fs):
        return conditional_writes.create(fs, path, data) is not None
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
    etag: str | None = None  # on S3: the ETag of this attempt's last write of its record, which rewrites must match
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _writing: threading.Lock = field(default_factory=threading.Lock)  # the heartbeat thread and fence() both renew

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
                print(f"extrema.run.lease: heartbeat failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def renew(self) -> None:
        """Write a fresh heartbeat, unless another attempt has taken the stage over (then LeaseLost)."""
        if self.etag is None:
            self.check_superseded()
        elif self.lost:
            raise LeaseLost(self.lost)
        began = time.monotonic()
        self._write({**self.record, "heartbeat_at": time.time()})
        self.renewed = began

    def _write(self, record: dict[str, Any]) -> None:
        """Rewrite this attempt's record: on S3 only while it is the version last written (else LeaseLost)."""
        with self._writing:
            if self.etag is None:
                rundir.write_json(self.url, record)
            else:
                fs, path = rundir.filesystem(self.url)
                etag = conditional_writes.replace(fs, path, _encode(record), self.etag)
                if etag is None:
                    self.lost = (
                        f"lease generation {self.generation} of {self.stage_dir} was taken over by another attempt"
                    )
                    raise LeaseLost(self.lost)
                self.etag = etag
            self.record = record

    def check_superseded(self) -> None:
        """LeaseLost when a later generation exists or this generation's record is no longer ours."""
        if self.lost:
            raise LeaseLost(self.lost)
        top = generations(self.stage_dir)
        if not top or top[-1] != self.generation:
            self.lost = f"stage {self.stage_dir} was taken over (generation {top[-1] if top else None} is current)"
            raise LeaseLost(self.lost)
        with self._writing:  # not while our own renewal is landing, its new ETag not yet noted
            mine = read_holder(self.stage_dir, self.generation)
            if self.etag is not None:
                changed = mine.etag != self.etag
            else:
                changed = bool(mine.record) and mine.record.get("token") != self.record["token"]
        if changed:
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
        """Mark the lease released with the attempt's outcome, so that the next attempt need not wait the TTL. Once:
        a later call (the job entry after the watchdog ended a hung attempt) does nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.lost:
            return
        with contextlib.suppress(Exception):
            if self.etag is None:
                self.check_superseded()
            self._write({**self.record, "released": True, "outcome": outcome, "released_at": time.time()})


def probe_conditional_writes(root_url: str) -> str | None:
    """Why the store at `root_url` cannot hold stage leases (two conflicting exclusive creates of one probe object
    do not have exactly one winner, or, on S3, a replace with a stale ETag succeeds), or None when it can. The
    probe object is removed."""
    fs, root = rundir.filesystem(root_url)
    if conditional_writes.speaks_s3(fs):
        return conditional_writes.probe(fs, root)
    url = rundir.join(root_url, f".exclusive-create-probe-{uuid.uuid4().hex}")
    try:
        wins = [create_exclusive(url, b"first\n"), create_exclusive(url, b"second\n")]
    finally:
        with contextlib.suppress(Exception):
            fs.rm_file(rundir.filesystem(url)[1])
    if wins != [True, False]:
        return f"two exclusive creates of one object: {'both' if all(wins) else 'neither'} succeeded, not exactly one"
    return None


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


def _encode(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2) + "\n").encode()


def _mark_taken_over(holder: Holder, gen: int) -> bool:
    """On S3, mark a free holder's record taken over by `gen`, on the ETag of the version judged free, so that its
    owner, should it still run, fails its next renewal; False when the record changed since (renewed, or marked by
    a rival). Released records and records already marked need no mark."""
    if holder.etag is None or holder.record.get("released") or "taken_over_by" in holder.record:
        return True
    mark = {"taken_over_by": gen, "damage": holder.damage} if holder.damage else {**holder.record, "taken_over_by": gen}
    fs, path = rundir.filesystem(holder.url)
    return conditional_writes.replace(fs, path, _encode(mark), holder.etag) is not None


def _create(stage_dir: str, gen: int, record: dict[str, Any]) -> Lease | None:
    """Create generation `gen` with `record`: this attempt's lease, or None when another attempt created it first."""
    url = _gen_url(stage_dir, gen)
    fs, path = rundir.filesystem(url)
    if not conditional_writes.speaks_s3(fs):
        return Lease(stage_dir, gen, record) if create_exclusive(url, _encode(record)) else None
    etag = conditional_writes.create(fs, path, _encode(record))
    return Lease(stage_dir, gen, record, etag=etag) if etag is not None else None


def try_acquire(stage_dir: str, job_id: str | None = None) -> Lease | Holder:
    """Take the stage if it is free (a new generation); else the live holder that owns it. A lost race is re-read
    and the next free generation tried, at most RACE_TRIES times with growing, jittered pauses; after as many lost
    races the holder last seen is returned, free or not (`acquire` tries again after its poll)."""
    holder: Holder | None = None
    for tries in range(RACE_TRIES):
        holder = current(stage_dir)
        if holder is not None and holder.why_free() is None:
            return holder
        if tries:  # the last race was lost, yet the stage looks free: its winner ended at once, or the store lags
            time.sleep(min(BACKOFF_CAP_S, BACKOFF_S * 2**tries) * random.uniform(0.5, 1.0))
        gen = (holder.generation if holder else 0) + 1
        if holder is not None and not _mark_taken_over(holder, gen):
            continue  # the holder renewed, or a rival marked it first: look again
        lease = _create(stage_dir, gen, my_record(gen, job_id))
        if lease is not None:
            _prune(stage_dir, gen)
            return lease
    if holder is None:
        raise OSError(f"{lease_dir(stage_dir)}: {RACE_TRIES} exclusive creates of generation 1 refused, none listed")
    return holder


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
