"""Where a stage's logs are and how to read them, whichever backend ran it.

- the files in `<run-dir>/<stage>/logs/`: the local backend's `local.<n>.log`, one per attempt, in the order the
  attempts started (an older store's single `local.log`, appended across attempts, before them), each shown under
  a header line naming its attempt; then the `ray-<job id>.log` copies a sweep saves there before it stops the
  local Ray head it started;
- what the stage's backend keeps of its job (`Backend.job_logs`): a Slurm job's submitit files in the sweep's log
  folder (`launch.backends.slurm.logs`); a Ray job's driver log, the stage's output included, read through the
  cluster's job API (`launch.backends.ray.logs` labels its lines).

Each source reads from an offset (`launch.backends.log_source`), so that `extrema-launch logs --follow` prints
only what is new (`Tail`). This module names no backend: it asks the class of the one a stage's status records.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from extrema.run import contract
from extrema.run.contract import StageDir
from launch.backends.base import RecordedJob, recorded_class
from launch.backends.log_source import Lines, LogSource, file_source, tail
from launch.runstore import store

if TYPE_CHECKING:
    from launch.sweepfile.model import LauncherSpec

SAID = "extrema: "  # how the project's own one-line reasons for stopping begin (a refused code snapshot, ...)
WARNING = "extrema: warning:"  # a line that says something about a job but is no reason it stopped
SAID_BYTES = 64 << 10  # how much of the end of each log is searched for one

LOCAL_LOG = re.compile(r"local(?:\.(\d{1,9}))?\.log")  # local.<n>.log per attempt; local.log in older stores


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


def stage_ranks(stage_dir: str) -> object:
    """provenance.json's `ranks` of a stage (every rank's host and pid), or None when there is none to read."""
    try:
        record = contract.read_record(StageDir(stage_dir).provenance)
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


def last_said(logs: list[LogSource]) -> str | None:
    """The last line beginning `extrema: ` (warnings aside) near the end of the last of these logs that has one (the
    one-line reason a job gave for stopping before it ran), cut to 300 characters; None when none has one or none can be
    read."""
    for src in reversed(logs):
        text = _end_of(src)
        lines = (line[line.find(SAID) :] for line in reversed(text.splitlines()) if SAID in line)
        said = next((line for line in lines if not line.startswith(WARNING)), None)
        if said is not None:
            return said.strip()[:300]
    return None


def _end_of(src: LogSource) -> str:
    """The text at the end of a log ("" when it cannot be read: it says nothing, the others may)."""
    try:
        return tail(src, SAID_BYTES).decode(errors="replace")
    except Exception:
        return ""


@dataclass(frozen=True)
class Part:
    """A piece of a stage's logs to show: a log's heading, new text of it, or why it cannot be read."""

    kind: Literal["heading", "text", "problem"]
    text: str


class Tail:
    """A stage's logs read on from where the last read left off (`logs --follow`): each log's offset and line
    labeller, the ranks they label with, and the logs that could not be read (said once)."""

    def __init__(self, stage_dir: str) -> None:
        self.stage_dir = stage_dir
        self.offsets: dict[str, int] = {}
        self.lines: dict[str, Lines] = {}
        self.ranks: object = None
        self.broken: set[str] = set()

    def read(self, sources: list[LogSource], ranks: object, final: bool) -> list[Part]:
        """What is new in each log since the last read (`final`: partial last lines too); lines are labelled
        afresh when `ranks` (provenance's) changed."""
        parts = []
        for src in sources:
            if src.name not in self.lines or ranks != self.ranks:
                self.lines.setdefault(src.name, Lines(src.label)).label = src.label
            try:
                chunk = src.read(self.offsets.get(src.name, 0))
            except Exception as e:
                if src.name not in self.broken:
                    self.broken.add(src.name)
                    parts.append(Part("problem", f"cannot read {src.name}: {type(e).__name__}: {e}"))
                continue
            named = len(sources) > 1 or not src.name.startswith(self.stage_dir)  # a lone logs/ file goes bare
            if chunk and not self.offsets.get(src.name) and named:
                parts.append(Part("heading", heading(src.name)))
            text = self.lines[src.name].feed(chunk.decode(errors="replace"), final=final)
            if text:
                parts.append(Part("text", text))
            self.offsets[src.name] = self.offsets.get(src.name, 0) + len(chunk)
        self.ranks = ranks
        return parts

    def rest(self) -> str:
        """The partial last lines of every log, labelled (when the reading ends)."""
        return "".join(pending.feed("", final=True) for pending in self.lines.values())

    def any_read(self) -> bool:
        """Whether any log had anything in it."""
        return any(self.offsets.values())
