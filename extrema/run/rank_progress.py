"""Each rank's progress, out of band: a small record per rank in the stage directory, and what is read from them.

Every rank of a running stage keeps `<stage>/ranks/<rank>.json` (written atomically by its watchdog thread, at most
every few seconds; no collective): its host and pid, the steps it finished and when it finished the last one, the
phase it is in and since when, its recent step times, and when the record was written. A record that stops being
written belongs to a process that cannot act (stopped, frozen, its node gone); a record still written whose step
does not move belongs to a rank that waits or is stuck. When a stage hangs, every live rank dumps the Python stacks
of its threads into `<stage>/hang/<rank>.txt` and the stage's status.json names the rank behind
(`describe_hang`). A rank whose collective failed leaves `<stage>/ranks/ended-<rank>.json`: what it saw and the
nodes of the peers it lost (`write_ending`), so that a lost rank 0, which cannot record the failure itself, is named
by the survivors when the launcher records the stage failed (`lost_peers`). Torch-free: `status` reads these records
too.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import time
from dataclasses import dataclass
from typing import Any

from extrema.run import contract, rundir

HANG_TIMEOUT_ENV = "EXTREMA_HANG_TIMEOUT_S"  # the launcher's resources.hang_timeout_s; 0 turns detection off
STRAGGLER_ACTION_ENV = "EXTREMA_STRAGGLER_ACTION"  # the launcher's resources.straggler_action
STRAGGLER_ACTIONS = ("flag", "fail")  # flag: recorded and shown; fail: the stage ends naming the node, as a hang does
DEFAULT_HANG_TIMEOUT_S = 300.0
RANKS_DIR = "ranks"  # <stage>/ranks/<rank>.json
HANG_DIR = "hang"  # <stage>/hang/<rank>.txt (stack dumps) and declared.json (the hang, as every rank learns it)
DECLARED = "declared.json"

# Phases, in the order a step passes them. A rank in a collective waits on its peers; one elsewhere does not.
STARTING = "starting"
LOADING = "loading data"
COMPUTE = "forward/backward"
SYNC = "collective/optimizer"
SAVING = "saving"
EVALUATING = "evaluating"
FINISHING = "finishing"
ENDED = "ended"
TRAINING = frozenset({LOADING, COMPUTE, SYNC})  # phases a step passes through: hang_timeout_s applies as it is
WAITS_ON_PEERS = {SYNC: 2, COMPUTE: 1}  # at an equal step, the rank NOT waiting in a collective is the one behind

STRAGGLER_RATIO = 1.5  # a rank's median time of its own (loading data) above this times the other ranks' median...
STRAGGLER_CHECKS = 3  # ...in this many consecutive checks (a window of WINDOW steps each) is flagged
STRAGGLER_MIN_SHARE = 0.1  # ...when that time is at least this share of the step
WINDOW = 20  # steps the medians of a record cover
STRAGGLERS = "stragglers.json"  # <stage>/ranks/stragglers.json: rank 0's findings
MAX_NOTE = 400  # characters of a rank's ending note shown in the stage's error
ENDING = "ended-{rank}.json"  # <stage>/ranks/ended-<rank>.json: how a rank's collective failed, and the nodes it lost


def hang_timeout_s() -> float:
    """Seconds without a finished step (or a record written) before a stage counts as hung: the launcher's setting
    (HANG_TIMEOUT_ENV), DEFAULT_HANG_TIMEOUT_S when unset or unreadable; 0 turns hang detection off."""
    try:
        value = float(os.environ.get(HANG_TIMEOUT_ENV, ""))
    except ValueError:
        return DEFAULT_HANG_TIMEOUT_S
    return value if math.isfinite(value) and value >= 0 else DEFAULT_HANG_TIMEOUT_S


def straggler_action() -> str:
    """What a persistent straggler does to its stage (STRAGGLER_ACTION_ENV): "flag" (the default, also for an
    unknown value) or "fail"."""
    value = os.environ.get(STRAGGLER_ACTION_ENV, STRAGGLER_ACTIONS[0])
    return value if value in STRAGGLER_ACTIONS else STRAGGLER_ACTIONS[0]


def record_url(stage_dir: str, rank: int) -> str:
    """Where rank `rank` keeps its progress record."""
    return rundir.join(stage_dir, RANKS_DIR, f"{rank}.json")


def dump_url(stage_dir: str, rank: int) -> str:
    """Where rank `rank` dumps its threads' stacks when the stage hangs."""
    return rundir.join(stage_dir, HANG_DIR, f"{rank}.txt")


def declared_url(stage_dir: str) -> str:
    """The hang as declared by the rank that reports it: every live rank that reads it dumps its stacks and ends."""
    return rundir.join(stage_dir, HANG_DIR, DECLARED)


@dataclass(frozen=True)
class RankRecord:
    """One rank's progress record (see the module docstring)."""

    rank: int
    host: str
    pid: int | None
    attempt: str  # rank 0's host:pid: records of an earlier attempt are not this one's
    step: int
    step_at: float
    phase: str
    phase_at: float
    written_at: float
    step_s: float | None = None  # median seconds per step over the last WINDOW steps
    data_s: float | None = None  # median seconds per step spent loading data (no collective: this rank's own)

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def parse(cls, doc: Any) -> RankRecord | None:
        """A record from its JSON, or None when it is not one."""
        if not isinstance(doc, dict):
            return None
        try:
            return cls(
                rank=int(doc["rank"]),
                host=str(doc["host"])[:255],
                pid=int(doc["pid"]) if isinstance(doc.get("pid"), int) else None,
                attempt=str(doc.get("attempt", "")),
                step=int(doc["step"]),
                step_at=float(doc["step_at"]),
                phase=str(doc["phase"])[:40],
                phase_at=float(doc["phase_at"]),
                written_at=float(doc["written_at"]),
                step_s=_number(doc.get("step_s")),
                data_s=_number(doc.get("data_s")),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def progress_at(self) -> float:
        """When this rank last moved on (finished a step or changed phase)."""
        return max(self.step_at, self.phase_at)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def write(stage_dir: str, record: RankRecord) -> None:
    """Write a rank's record (atomic)."""
    rundir.write_json(record_url(stage_dir, record.rank), record.as_json())


def read(stage_dir: str, rank: int) -> RankRecord | None:
    """One rank's record, or None when there is none or it does not parse."""
    try:
        return RankRecord.parse(contract.read_record(record_url(stage_dir, rank)))
    except (contract.Unreadable, OSError):
        return None


def read_all(stage_dir: str, attempt: str | None = None) -> dict[int, RankRecord]:
    """Every rank's record in the stage directory (of one attempt when given), by rank."""
    fs, path = rundir.filesystem(rundir.join(stage_dir, RANKS_DIR))
    try:
        names = [str(n).rsplit("/", 1)[-1] for n in fs.ls(path, detail=False, refresh=True)]
    except (FileNotFoundError, NotADirectoryError, TypeError):
        names = []
    except OSError:
        return {}
    out = {}
    for name in names:
        stem = name.removesuffix(".json")
        if not name.endswith(".json") or not stem.isdigit():
            continue
        rec = read(stage_dir, int(stem))
        if rec is not None and (attempt is None or rec.attempt == attempt):
            out[rec.rank] = rec
    return out


def frozen(rec: RankRecord, now: float, stale_after: float) -> bool:
    """Whether a rank's record stopped being written (its process cannot act: stopped, frozen, gone)."""
    return rec.phase != ENDED and now - rec.written_at > stale_after


def behind(records: dict[int, RankRecord], world: int, now: float, stale_after: float) -> tuple[int, str]:
    """The rank the others wait for, and why: a rank with no record, else the one whose record went stale longest
    ago (it cannot act), else the fewest steps, then one not waiting in a collective, then the oldest progress."""
    missing = [r for r in range(world) if r not in records]
    if missing:
        return missing[0], "no progress record"
    stale = [r for r in records.values() if frozen(r, now, stale_after)]
    if stale:
        r = min(stale, key=lambda r: r.written_at)
        return r.rank, f"its record stopped {now - r.written_at:.0f} s ago: the process is stopped or frozen"
    r = min(records.values(), key=lambda r: (r.step, WAITS_ON_PEERS.get(r.phase, 0), r.progress_at()))
    return r.rank, f"no progress for {now - r.progress_at():.0f} s"


MAIN_HEADER = "main thread "  # the first line of a dump: "main thread 0x00007f...", as faulthandler names it
FRAME = re.compile(r'^\s*File "(?P<file>[^"]*)", line (?P<line>\d+) in (?P<fn>\S+)')


def innermost_frame(dump: str) -> str | None:
    """The innermost frame of the main thread in a faulthandler dump written by the watchdog ('file:line function')."""
    lines = dump.splitlines()
    if not lines or not lines[0].startswith(MAIN_HEADER):
        return None
    ident = lines[0].removeprefix(MAIN_HEADER).strip()
    for i, line in enumerate(lines):
        if line.startswith(("Thread ", "Current thread ")) and ident in line:
            for frame in lines[i + 1 :]:
                m = FRAME.match(frame)
                if m:
                    return f"{m['file']}:{m['line']} {m['fn']}"
                if not frame.strip():
                    break
    return None


def describe_hang(stage_dir: str, rec: RankRecord | None, rank: int, why: str, frame: str | None) -> str:
    """The one line status.json records for a hang."""
    where = f" at {frame}" if frame else ", its stack is unavailable (the process did not respond)"
    stacks = f"stacks in {rundir.join(stage_dir, HANG_DIR)}/"
    if rec is None:
        return f"hung: rank {rank}{where}; {why}; {stacks}"
    place = f"rank {rank} on {rec.host} (pid {rec.pid})"
    return f"hung at step {rec.step + 1}: {place} in {rec.phase}{where}; {why}; {stacks}"


def stragglers(records: dict[int, RankRecord]) -> list[int]:
    """Ranks slower than the others at what they do alone (one check): a step's wall time is the same on every
    rank of synchronous training (the collectives wait for the slowest), so the time a rank spends loading data,
    which waits on no peer, is what tells a slow node. Flagged: over STRAGGLER_RATIO times the median of the other
    ranks (of two ranks, the other's time), and at least STRAGGLER_MIN_SHARE of the step."""
    times = {r: rec.data_s for r, rec in records.items() if rec.data_s is not None}
    if len(times) < 2:
        return []
    ordered = sorted(times.values())
    return [
        r
        for r, t in times.items()
        if t > STRAGGLER_RATIO * median_without(ordered, t)
        and t >= STRAGGLER_MIN_SHARE * (records[r].step_s or math.inf)
    ]


def median_without(ordered: list[float], value: float) -> float:
    """The median of a sorted list with one occurrence of `value` left out, without copying it (rank 0 asks this
    for every rank at every check: a thousand ranks stay a sort, not a million comparisons)."""
    gone = bisect.bisect_left(ordered, value)
    n = len(ordered) - 1

    def kept(j: int) -> float:
        return ordered[j] if j < gone else ordered[j + 1]

    return kept(n // 2) if n % 2 else (kept(n // 2 - 1) + kept(n // 2)) / 2


def describe_stragglers(ranks: list[dict[str, Any]], median_data_s: float) -> str:
    """The one line status.json records for a stage ended by its stragglers (straggler_action: fail)."""
    shown = [
        f"rank {r['rank']} on {r['host']} loads data in {r['data_s']:.3f} s a step "
        f"({r['data_s'] / median_data_s if median_data_s > 0 else math.inf:.1f}x the other ranks' median "
        f"{median_data_s:.3f} s)"
        for r in ranks
    ]
    return f"straggler: {'; '.join(shown)}; ended (straggler_action: fail), its node avoided on retry"


def stragglers_url(stage_dir: str) -> str:
    """Where rank 0 records the ranks it found persistently slow."""
    return rundir.join(stage_dir, RANKS_DIR, STRAGGLERS)


def summary(stage_dir: str, now: float) -> str | None:
    """A running stage's ranks in a few words for `status`: the rank furthest behind (its host, step, phase and the
    age of its progress), one whose record went silent, and the stragglers; None when the stage keeps no records."""
    records = read_all(stage_dir)
    if not records:
        return None
    attempt = max(records.values(), key=lambda r: r.written_at).attempt
    records = {k: r for k, r in records.items() if r.attempt == attempt}
    slow = min(records.values(), key=lambda r: (r.step, WAITS_ON_PEERS.get(r.phase, 0), r.progress_at()))
    text = (
        f"{len(records)} ranks; behind: rank {slow.rank} on {slow.host} step {slow.step} {slow.phase} "
        f"{max(0.0, now - slow.progress_at()):.0f}s"
    )
    silent = max(records.values(), key=lambda r: now - r.written_at)
    if silent.phase != ENDED and now - silent.written_at > 30:
        text += f"; rank {silent.rank} on {silent.host} silent {now - silent.written_at:.0f}s"
    try:
        flagged = contract.read_record(stragglers_url(stage_dir)) or {}
    except (contract.Unreadable, OSError):
        flagged = {}
    ranks = flagged.get("ranks") if flagged.get("attempt") == attempt else None
    if isinstance(ranks, list) and ranks:
        shown = [f"rank {r.get('rank')} on {r.get('host')}" for r in ranks[:4] if isinstance(r, dict)]
        text += "; stragglers: " + ", ".join(shown)
    return text


def ending_url(stage_dir: str, rank: int) -> str:
    """Where rank `rank` says how its collective failed."""
    return rundir.join(stage_dir, RANKS_DIR, ENDING.format(rank=rank))


@dataclass(frozen=True)
class Lost:
    """What a rank whose collective failed lost: the nodes, the ranks on them ("rank 0 on n1"), and how it failed."""

    nodes: list[str]
    ranks: list[str]
    note: str


def write_ending(stage_dir: str, rank: int, host: str, job_id: str | None, lost: Lost) -> None:
    """Rank `rank` on `host` (of job `job_id`) lost its peers (not fenced by the lease: it is this rank's account,
    not the stage's status)."""
    doc = {"rank": rank, "host": host, "job_id": job_id, "lost": lost.nodes, "lost_ranks": lost.ranks}
    rundir.write_json(ending_url(stage_dir, rank), {**doc, "note": lost.note[:2000], "at": time.time()})


def endings(stage_dir: str, since: float) -> list[dict[str, Any]]:
    """The ending records written at or after `since`, by rank."""
    fs, path = rundir.filesystem(rundir.join(stage_dir, RANKS_DIR))
    try:
        names = [str(n).rsplit("/", 1)[-1] for n in fs.ls(path, detail=False, refresh=True)]
    except (OSError, TypeError):
        return []
    out = []
    for name in sorted(names):
        stem = name.removeprefix("ended-").removesuffix(".json")
        if not (name.startswith("ended-") and name.endswith(".json") and stem.isdigit()):
            continue
        try:
            doc = contract.read_record(ending_url(stage_dir, int(stem)))
        except (contract.Unreadable, OSError):
            continue
        if doc and isinstance(doc.get("at"), (int, float)) and doc["at"] >= since and isinstance(doc.get("lost"), list):
            out.append(doc)
    return out


def lost_peers(stage_dir: str, since: float) -> tuple[list[str], str | None]:
    """(the nodes surviving ranks lost since `since`, one line naming the ranks lost and who saw it), from the ending
    records; ([], None) when no rank left one."""
    seen = [doc for doc in endings(stage_dir, since) if doc["lost"]]
    nodes = list(dict.fromkeys(str(n) for doc in seen for n in doc["lost"] if isinstance(n, str) and n))
    if not nodes:
        return [], None
    first = seen[0]
    ranks = first.get("lost_ranks")
    shown = ", ".join(map(str, (ranks if isinstance(ranks, list) else first["lost"])[:8]))
    note = str(first.get("note"))[:MAX_NOTE]
    return nodes, f"{shown} lost, as rank {first.get('rank')} on {first.get('host')} saw it: {note}"
