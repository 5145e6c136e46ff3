"""The bytes a run store holds: every file below a URL with its size, from one recursive listing, and their sums by
run, stage and kind (checkpoints, logs, other).

One listing is one request per thousand objects on an object store (`fs.find(detail=True)`), never one per file.
On this machine's disks the walk never follows a symbolic link (a link is counted as itself, however large what
it points to), so nothing outside the store is counted. Sizes are apparent sizes (what `ls -l` shows).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fsspec.implementations.local import LocalFileSystem

from extrema.run import contract, rundir
from launch.runstore import store

KINDS = ("checkpoints", "logs", "other")
SWEEP_OWN = "(sweep)"  # the run column of a sweep's own files: manifest, ledger, code snapshots, backend logs
RUN_RECORDS = (contract.STATUS, contract.SPEC)  # `<dir>/<stage>/<one of these>` makes `<dir>` a run


@dataclass(frozen=True)
class Found:
    """One file of a listing: its path below the listed folder ('/'-separated) and its size in bytes."""

    path: str
    size: int

    @property
    def parts(self) -> list[str]:
        """The path's components."""
        return self.path.split("/")


@dataclass
class Tally:
    """Files and bytes, by kind."""

    files: int = 0
    checkpoints: int = 0
    logs: int = 0
    other: int = 0

    def add(self, kind: str, size: int) -> None:
        """Count one file of `kind` (one of KINDS)."""
        self.files += 1
        setattr(self, kind, getattr(self, kind) + size)

    def merge(self, more: Tally) -> None:
        """Add another tally's counts to this one."""
        self.files += more.files
        for kind in KINDS:
            setattr(self, kind, getattr(self, kind) + getattr(more, kind))

    @property
    def total(self) -> int:
        """Bytes of every kind."""
        return self.checkpoints + self.logs + self.other

    def record(self) -> dict[str, int]:
        """The counts as a JSON record."""
        return {"files": self.files, **{k: getattr(self, k) for k in KINDS}, "total": self.total}


@dataclass
class SweepUsage:
    """A sweep's bytes: one tally per (run, stage), and per (SWEEP_OWN, top-level folder) for the sweep's own files."""

    rows: dict[tuple[str, str], Tally] = field(default_factory=dict)
    runs: set[str] = field(default_factory=set)

    def total(self) -> Tally:
        """Every row summed."""
        return summed(self.rows.values())


def summed(tallies: Iterable[Tally]) -> Tally:
    """Tallies added up."""
    out = Tally()
    for t in tallies:
        out.merge(t)
    return out


def listed(url: str, problems: list[str] | None = None) -> list[Found]:
    """Every file below `url` with its size, from one recursive listing ([] when nothing is there); a local folder
    that cannot be read is left out and, with `problems`, listed there as `path: reason`."""
    fs, path = rundir.filesystem(url)
    base = str(path).rstrip("/")
    if isinstance(fs, LocalFileSystem):
        return _walk(base, [] if problems is None else problems)
    fs.invalidate_cache(base)  # a cached listing would miss what other processes wrote since
    try:
        found = fs.find(base, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    prefix = base + "/"
    return [
        Found(p[len(prefix) :], int(info.get("size") or 0))
        for p, info in found.items()
        if p.startswith(prefix) and info.get("type") != "directory"
    ]


def _walk(top: str, problems: list[str]) -> list[Found]:
    out: list[Found] = []
    todo = [""]
    while todo:
        rel = todo.pop()
        here = f"{top}/{rel}" if rel else top
        try:
            entries = list(os.scandir(here))
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            problems.append(f"{here}: {contract.os_reason(e, path=False)}")
            continue
        for entry in entries:
            name = f"{rel}/{entry.name}" if rel else entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    todo.append(name)
                else:
                    out.append(Found(name, entry.stat(follow_symlinks=False).st_size))
            except FileNotFoundError:  # removed since the folder was read
                continue
    return sorted(out, key=lambda f: f.path)


def run_dirs(files: Iterable[Found]) -> set[str]:
    """The top-level folders of a sweep's listing that are runs: they hold a stage with a status or spec record."""
    return {p[0] for f in files if len(p := f.parts) == 3 and p[2] in RUN_RECORDS}


def kind_of(below: Sequence[str]) -> str:
    """The kind of a file by its path below a stage (or below a sweep, for its own files): `ckpt/...` checkpoints,
    `logs/...` logs, anything else other."""
    if len(below) > 1 and below[0] == contract.CHECKPOINTS:
        return "checkpoints"
    if len(below) > 1 and below[0] == contract.LOGS:
        return "logs"
    return "other"


def of_sweep(files: Iterable[Found]) -> SweepUsage:
    """A sweep's bytes by run and stage (a file directly in a run folder: stage '-'), and its own by folder."""
    files = list(files)
    out = SweepUsage(runs=run_dirs(files))
    for f in files:
        p = f.parts
        if p[0] in out.runs and len(p) > 1:
            key, below = (p[0], p[1] if len(p) > 2 else "-"), p[2:]
        else:
            key, below = (SWEEP_OWN, p[0].removesuffix(".json") if len(p) == 1 else p[0]), p
        out.rows.setdefault(key, Tally()).add(kind_of(below), f.size)
    return out


def tally(files: Iterable[Found]) -> Tally:
    """Files as one tally, each of the kind its own path says."""
    out = Tally()
    for f in files:
        out.add(kind_of(f.parts), f.size)
    return out


def split_root(files: Iterable[Found]) -> tuple[dict[str, list[Found]], list[Found]]:
    """A root's listing split into its sweeps' (name -> files below the sweep; a sweep is a folder with a manifest)
    and the files outside any sweep."""
    files = list(files)
    names = {p[0] for f in files if len(p := f.parts) == 2 and p[1] == store.MANIFEST}
    sweeps: dict[str, list[Found]] = {n: [] for n in sorted(names)}
    outside: list[Found] = []
    for f in files:
        name, _, rest = f.path.partition("/")
        if name in sweeps and rest:
            sweeps[name].append(Found(rest, f.size))
        else:
            outside.append(f)
    return sweeps, outside
