"""Where a stage's logs are and how to read them, whichever backend ran it.

- the files in `<run-dir>/<stage>/logs/`: the local backend's `local.<n>.log`, one per attempt, in the order the
  attempts started (an older store's single `local.log`, appended across attempts, before them), each shown under
  a header line naming its attempt; then the `ray-<job id>.log` copies a sweep saves there before it stops the
  local Ray head it started;
- what the stage's backend keeps of its job (`Backend.job_logs`): a Slurm job's submitit files in the sweep's log
  folder, `<job id>_<rank>_log.out` and `.err`, rank by rank (job ids are `<array>_<index>` or `<id>`; requeued
  attempts append to the same files); a Ray job's driver log (the stage's output included), read through the
  cluster's job API. The readers and line labels of those formats are here.

Each source reads from an offset, so that `extrema-launch logs --follow` prints only what is new.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from extrema.run import contract, rundir
from launch import store
from launch.backends.base import RecordedJob, recorded_class
from launch.backends.slurm_plan import JOB_ID

if TYPE_CHECKING:
    from launch.sweep import LauncherSpec

SLURM_LOG = r"_(\d+)_log\.(out|err)"
LOCAL_LOG = re.compile(r"local(?:\.(\d{1,9}))?\.log")  # local.<n>.log per attempt; local.log in older stores


SUBMITIT_START = re.compile(r"Starting with JobEnvironment\(job_id=[^,]*, hostname=([^,\s]+),")
COLOR = r"(?:\x1b\[[0-9;]*m)*"  # Ray colours the prefix when its driver writes to a terminal
RAY_PREFIX = re.compile(COLOR + r"\((?:[A-Za-z_][\w.]* )?pid=(\d+)(?:, ip=([0-9A-Fa-f.:]+))?\) ?" + COLOR + " ?")


@dataclass(frozen=True)
class LogSource:
    """One log: a name to show, a reader of its bytes from an offset, and what names each line's node and rank."""

    name: str
    read: Callable[[int], bytes]
    label: Callable[[str], str] | None = None  # a complete line -> the line with its node and rank in front


class Lines:
    """Labels the lines of one log as its chunks arrive; a line cut between two chunks is labelled once."""

    def __init__(self, label: Callable[[str], str] | None) -> None:
        self.label = label
        self.partial = ""

    def feed(self, text: str, final: bool = False) -> str:
        """The labelled complete lines of `text` (and the pending partial line when `final`)."""
        if self.label is None:
            return text
        text, self.partial = self.partial + text, ""
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith(("\n", "\r")) and not final:
            self.partial = lines.pop()
        return "".join(self.label(line) for line in lines)


def rank_hosts(ranks: object) -> dict[int, str]:
    """rank -> host from provenance's `ranks` list (entries that are not well-formed are skipped)."""
    out: dict[int, str] = {}
    for r in ranks if isinstance(ranks, list) else []:
        if isinstance(r, dict) and isinstance(r.get("rank"), int) and isinstance(r.get("host"), str):
            out[r["rank"]] = r["host"]
    return out


def slurm_label(rank: int, host: str | None) -> Callable[[str], str]:
    """Labels a Slurm task's lines `[<node> rank <r>]`; the node is taken from each attempt's submitit header
    (requeued attempts append to the same file and may run elsewhere), else from provenance."""
    seen = {"host": host or "?"}

    def label(line: str) -> str:
        m = SUBMITIT_START.search(line)
        if m:
            seen["host"] = m.group(1)
        return f"[{seen['host']} rank {rank}] {line}"

    return label


def ray_label(ranks: object) -> Callable[[str], str]:
    """Labels the Ray workers' lines of a job log `[<node> rank <r>]` by their pid (from provenance), else by
    their node's address; the driver's own lines stay as they are."""
    by_pid = {
        r["pid"]: (r["rank"], r["host"])
        for r in (ranks if isinstance(ranks, list) else [])
        if isinstance(r, dict) and isinstance(r.get("pid"), int) and isinstance(r.get("rank"), int)
    }

    def label(line: str) -> str:
        m = RAY_PREFIX.match(line)
        if m is None:
            return line
        rest = line[m.end() :]
        pid = int(m.group(1))
        if pid in by_pid:
            rank, host = by_pid[pid]
            return f"[{host} rank {rank}] {rest}"
        return f"[{m.group(2) or 'pid ' + m.group(1)}] {rest}"

    return label


def file_source(url: str) -> LogSource:
    """A log file on any fsspec URL."""

    def read(offset: int) -> bytes:
        fs, path = rundir.filesystem(url)
        with fs.open(path, "rb") as f:
            f.seek(offset)
            data: bytes = f.read()
        return data

    return LogSource(url, read)


def local_attempt(url: str) -> int | None:
    """The attempt number of a local backend log (`local.<n>.log`; 0 for an older store's single `local.log`), or
    None for another file."""
    m = LOCAL_LOG.fullmatch(url.rstrip("/").rsplit("/", 1)[-1])
    return None if m is None else int(m.group(1) or 0)


def in_attempt_order(urls: list[str]) -> list[str]:
    """A stage's `logs/` files: the local backend's attempt logs first, in the order the attempts started, then
    the others by name."""

    def key(url: str) -> tuple[int, int, str]:
        n = local_attempt(url)
        return (0, n, url) if n is not None else (1, 0, url)

    return sorted(urls, key=key)


def heading(name: str) -> str:
    """The line shown above a log: `==> attempt <n>: <name> <==` for a local backend's attempt log."""
    n = local_attempt(name)
    if n is None:
        return f"==> {name} <=="
    return f"==> attempt {n}: {name} <==" if n else f"==> earlier attempts, one file: {name} <=="


def slurm_files(log_dir: str, job_id: str) -> list[str]:
    """The submitit stdout/stderr files of one Slurm job or array task, rank 0 first, .out before .err."""
    if not JOB_ID.fullmatch(job_id):
        return []
    fs, path = rundir.filesystem(log_dir)
    pattern = re.compile(re.escape(job_id) + SLURM_LOG)
    found = []
    for p in fs.glob(f"{path}/{job_id}_*_log.*"):
        m = pattern.fullmatch(p.rsplit("/", 1)[-1])
        if m:
            found.append((int(m.group(1)), m.group(2) == "err", p))
    return [fs.unstrip_protocol(p) if "://" in log_dir else p for *_, p in sorted(found)]


def slurm_rank(url: str) -> int:
    """The task (rank) of a submitit log file `<job id>_<rank>_log.<out|err>`."""
    return int(re.findall(SLURM_LOG, url.rsplit("/", 1)[-1])[-1][0])


def stage_ranks(stage_dir: str) -> object:
    """provenance.json's `ranks` of a stage (every rank's host and pid), or None when there is none to read."""
    try:
        record = contract.read_record(rundir.join(stage_dir, "provenance.json"))
    except contract.Unreadable:
        return None
    return record.get("ranks") if isinstance(record, dict) else None


def sources(
    stage_dir: str,
    status: Mapping[str, Any],
    manifest: Mapping[str, Any] | None,
    launcher: LauncherSpec,
    ranks: object = None,
) -> list[LogSource]:
    """Every log of a stage: its `logs/` files, then those its backend keeps of its current job. `ranks`
    (provenance's list of every rank's host and pid) names each line's node and rank where the backend can."""
    kept = [file_source(u) for u in in_attempt_order(store.log_files(stage_dir))]
    job_id, backend = str(status.get("job_id") or ""), recorded_class(status.get("backend"))
    if not job_id or backend is None:
        return kept
    return backend.job_logs(kept, RecordedJob(job_id, status, manifest, launcher, ranks))
