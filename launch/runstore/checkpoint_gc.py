"""Checkpoints of completed stages beyond their retention: what `extrema-launch gc` would remove, and removing it.

A completed stage keeps what its spec's retention keeps (`keep_last`, `keep_every`: `extrema.run.checkpoint_dirs`);
its older complete steps and any step that never got its `.metadata` are collected, and with `corrupt` the steps
set aside in `ckpt/corrupt/`. The newest complete step, which downstream stages and `export` read, and the
exported encoders (`export/`) are never collected. A stage that is not completed, whose spec names no retention,
or whose lease a live attempt holds is left as it is, with the reason.

Removing takes the stage's lease first (`extrema.run.lease.try_acquire`, no waiting), so no attempt can start in
the stage while its folders go; it re-reads the status under the lease, fences before each folder and releases
the lease after.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from extrema.run import checkpoint_dirs, contract, lease, rundir
from extrema.run.contract import StageDir, StageState, Unreadable
from extrema.spec_groups import Retention
from launch.runstore import store
from launch.runstore.disk_usage import Found

HOLDER_JOB = "extrema-launch gc"  # the job id gc's own lease records carry


@dataclass
class StageCheckpoints:
    """A stage's `ckpt/` as the listing shows it: files by step folder, the complete steps, set-aside folders."""

    steps: dict[int, list[Found]] = field(default_factory=dict)
    complete: set[int] = field(default_factory=set)
    corrupt: dict[str, list[Found]] = field(default_factory=dict)  # folder name in ckpt/corrupt/ -> its files

    def maybe_extra(self, corrupt: bool) -> bool:
        """Whether anything could be beyond retention (before the spec is read)."""
        return len(self.complete) > 1 or len(self.steps) > len(self.complete) or (corrupt and bool(self.corrupt))


@dataclass(frozen=True)
class Folder:
    """One folder gc removes: its path below the sweep, why it goes, and its files."""

    path: str
    why: str
    files: tuple[Found, ...]

    @property
    def size(self) -> int:
        """Its bytes."""
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Removal:
    """What gc removes of one completed stage."""

    key: str
    folders: tuple[Folder, ...]

    @property
    def size(self) -> int:
        """Bytes freed."""
        return sum(f.size for f in self.folders)


@dataclass
class Plan:
    """A sweep's removals, and the stages left as they are with the reason."""

    sweep: str
    removals: list[Removal] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Bytes freed by every removal."""
        return sum(r.size for r in self.removals)


def checkpoints_of(files: Sequence[Found]) -> dict[str, StageCheckpoints]:
    """Job key -> what the stage's `ckpt/` holds, from a sweep's listing (stages with safe names only)."""
    out: dict[str, StageCheckpoints] = {}
    for f in files:
        p = f.parts
        if len(p) < 5 or p[2] != contract.CHECKPOINTS:
            continue
        try:
            key = store.job_key(p[0], p[1])
        except ValueError:
            continue
        found = out.setdefault(key, StageCheckpoints())
        step = checkpoint_dirs.step_of(p[3])
        if step is not None:
            found.steps.setdefault(step, []).append(f)
            if p[4:] == [checkpoint_dirs.COMMIT_MARKER]:
                found.complete.add(step)
        elif p[3] == checkpoint_dirs.CORRUPT_DIR and len(p) > 5:
            found.corrupt.setdefault(p[4], []).append(f)
    return out


def retention_of(spec: Any, stage: str) -> Retention | str:
    """The retention a stage's spec.json sets, or why it gives none."""
    if isinstance(spec, Unreadable):
        return f"its spec is unreadable ({spec.reason})"
    experiment = spec.get("experiment") if isinstance(spec, dict) else None
    settings = experiment.get(stage) if isinstance(experiment, dict) else None
    if not isinstance(settings, dict) or "keep_last" not in settings:
        return "its spec sets no retention (keep_last)"
    try:
        return Retention.model_validate({k: settings[k] for k in ("keep_last", "keep_every") if k in settings})
    except ValidationError as e:
        return f"its spec's retention is malformed ({e.error_count()} problem(s))"


def folders_beyond(key: str, found: StageCheckpoints, keep: Retention, corrupt: bool) -> list[Folder]:
    """The folders of one completed stage's `ckpt/` that its retention does not keep."""
    run_id, stage = store.split_key(key)
    ckpt = f"{run_id}/{stage}/{contract.CHECKPOINTS}"
    beyond = checkpoint_dirs.beyond_retention(found.complete, keep.keep_last, keep.keep_every)
    every = f", not a multiple of keep_every {keep.keep_every}" if keep.keep_every else ""
    why = {s: f"beyond keep_last {keep.keep_last}{every}" for s in beyond}
    why.update({s: "incomplete (no .metadata)" for s in found.steps if s not in found.complete})
    out = [Folder(f"{ckpt}/step-{s}", w, tuple(found.steps[s])) for s, w in sorted(why.items())]
    if corrupt:
        out += [
            Folder(f"{ckpt}/{checkpoint_dirs.CORRUPT_DIR}/{n}", "set aside as corrupt", tuple(fs))
            for n, fs in sorted(found.corrupt.items())
        ]
    return out


def plan(sweep: str, files: Sequence[Found], corrupt: bool = False) -> Plan:
    """What gc would remove from the sweep at URL `sweep`, given its listing; reads the statuses and specs of the
    stages whose `ckpt/` could hold more than their retention, and the leases of those that do."""
    out = Plan(sweep)
    found = {k: c for k, c in checkpoints_of(files).items() if c.maybe_extra(corrupt)}
    keys = sorted(found)
    statuses = store.read_statuses(sweep, keys)
    stages = {k: store.stage_url(sweep, *store.split_key(k)) for k in keys}
    specs = dict(zip(keys, store.read_many(sweep, [StageDir(stages[k]).spec for k in keys])))
    for key in keys:
        state = statuses[key].get("state")
        if state != StageState.COMPLETED:
            shown = statuses[key].get("error") if state == store.UNREADABLE else state or "never started"
            out.skipped[key] = f"{shown}: only completed stages are collected"
            continue
        keep = retention_of(specs[key], store.split_key(key)[1])
        if isinstance(keep, str):
            out.skipped[key] = keep
            continue
        folders = folders_beyond(key, found[key], keep, corrupt)
        if not folders:
            continue
        holder = lease.live_holder(stages[key])
        if holder is not None:
            out.skipped[key] = f"held by a live attempt ({holder.describe()})"
            continue
        out.removals.append(Removal(key, tuple(folders)))
    return out


class Held(Exception):
    """A stage gc did not touch after all: a live attempt holds its lease, or it is no longer completed."""


def remove(sweep: str, removal: Removal) -> None:
    """Remove one stage's folders under its lease (Held when it cannot be taken or the stage is no longer
    completed); OSError naming the path when the store refuses."""
    stage = store.stage_url(sweep, *store.split_key(removal.key))
    got = lease.try_acquire(stage, job_id=HOLDER_JOB)
    if isinstance(got, lease.Holder):
        raise Held(f"held by a live attempt ({got.describe()})")
    try:
        if store.read_status(stage).get("state") != StageState.COMPLETED:
            raise Held("no longer completed")
        for folder in removal.folders:
            got.fence(f"removing {folder.path}")
            remove_folder(sweep, folder)
    finally:
        got.release("checkpoints collected")


def remove_folder(sweep: str, folder: Folder) -> None:
    """Remove one folder of the sweep: on this machine without following a link (one leading out is refused), on
    an object store its listed files in batched deletes."""
    url = rundir.join(sweep, folder.path)
    tree = store.local_tree(sweep)
    if tree is not None:
        if tree.leaves(url):
            raise OSError(f"{url}: {contract.LEAVES}")
        with contextlib.suppress(FileNotFoundError):  # gone since it was listed
            shutil.rmtree(tree.path_of(url))
        return
    fs, base = rundir.filesystem(sweep)
    fs.rm([f"{str(base).rstrip('/')}/{f.path}" for f in folder.files])
