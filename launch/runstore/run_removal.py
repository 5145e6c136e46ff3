"""Removing whole runs from a sweep: their directories, their place in the manifest and what the ledger holds of
them, so that `status`, `results` and `report` no longer show them.

In this order, so that an interruption anywhere leaves a store every reader reads right and a second `rm`
finishes the job: the ledger revokes the runs' completed stages (a reader then takes each stage from its own
files); each stage's lease is taken without waiting (a live attempt refuses the removal), the stage emptied but for
its lease folder and the run's directory removed, lease folders with it (an attempt waiting on the lease then finds
an empty stage, never a half-removed one); the manifest is written without the runs; the ledger revokes again
whatever a reader added meanwhile. Manifest parts no longer listed are removed by a later `sweep`
(`store.write_manifest`, after `store.PART_GRACE_S`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Sequence

from extrema.run import contract, lease, rundir
from launch.runstore import ledger, store
from launch.runstore.disk_usage import Found

HOLDER_JOB = "extrema-launch rm"  # the job id rm's own lease records carry
STAGE_MARKS = (lease.LEASE_DIR, contract.STATUS, contract.SPEC)  # `<run>/<dir>/<one of these>` makes `<dir>` a stage


class Refused(Exception):
    """A run not removed: a live attempt took one of its stages' leases since it was checked."""


def stages_present(run_id: str, stages: Iterable[str], files: Sequence[Found]) -> list[str]:
    """The stage folders of a run that hold files: its manifest stages, and any folder with a lease or a record."""
    named = set(stages)
    present = {p[1] for f in files if len(p := f.parts) >= 3 and p[0] == run_id}
    marked = {p[1] for f in files if len(p := f.parts) >= 3 and p[0] == run_id and p[2] in STAGE_MARKS}
    out = []
    for name in sorted((named & present) | marked):
        with contextlib.suppress(ValueError):  # a folder no stage could be named: removed with its run, unleased
            out.append(store.safe_name(name, "stage"))
    return out


def refusal(sweep: str, run_id: str, stages: Sequence[str]) -> str | None:
    """Why the run's stages may not be removed now (one line naming the stage and its holder or job), or None."""
    keys = [store.job_key(run_id, s) for s in stages]
    for key in keys:
        stage = store.stage_url(sweep, *store.split_key(key))
        holder = lease.live_holder(stage)
        if holder is not None:
            return f"{stage}: held by a live attempt ({holder.describe()}); nothing removed"
    for key, status in store.read_statuses(sweep, keys).items():
        if status.get("state") in contract.IN_FLIGHT and not store.interrupted_submission(status):
            job = f" ({status.get('backend')} job {status['job_id']})" if status.get("job_id") else ""
            return (
                f"{store.stage_url(sweep, *store.split_key(key))}: {status['state']}{job}; cancel it first "
                f"(extrema-launch cancel {sweep} --run {run_id}); nothing removed"
            )
    return None


def revoke(sweep: str, keys: Iterable[str]) -> None:
    """Revoke what the ledger holds of these stages (nothing is written when it holds none of them)."""
    held = ledger.read(sweep, store.real_tree(sweep))
    gone = [k for k in keys if k in held]
    if gone:
        ledger.append(sweep, {}, revoked=gone)


def remove_runs(sweep: str, runs: Sequence[store.StoredRun], files: Sequence[Found]) -> None:
    """Remove the runs (their stages as `stages_present` finds them in `files`, the sweep's listing) from the sweep;
    Refused (nothing of that run removed) when a stage's lease is live, OSError naming the path when the store
    refuses a removal."""
    keys = [k for r in runs for k in r.job_keys()]
    revoke(sweep, keys)
    for run in runs:
        remove_run(sweep, run.run_id, stages_present(run.run_id, run.stages, files), files)
    write_manifest_without(sweep, {r.run_id for r in runs})
    revoke(sweep, keys)


def remove_run(sweep: str, run_id: str, stages: Sequence[str], files: Sequence[Found]) -> None:
    """Take every stage's lease, empty the stages but for their lease folders, then remove the run's directory."""
    run = store.run_url(sweep, run_id)
    tree = store.local_tree(sweep)
    if tree is not None and tree.leaves(run):
        raise OSError(f"{run}: {contract.LEAVES}")
    held: list[lease.Lease] = []
    for stage in stages:
        url = store.stage_url(sweep, run_id, stage)
        if tree is not None and tree.leaves(url):
            raise OSError(f"{url}: {contract.LEAVES}")
        got = lease.try_acquire(url, job_id=HOLDER_JOB)
        if isinstance(got, lease.Holder):
            for mine in held:
                mine.release("not removed")
            raise Refused(f"{url}: held by a live attempt ({got.describe()}); run {run_id} not removed")
        held.append(got)
    for mine, stage in zip(held, stages):
        mine.fence(f"removing {run_id}/{stage}")
        empty_stage(sweep, run_id, stage, files)
    remove_tree(run)


def empty_stage(sweep: str, run_id: str, stage: str, files: Sequence[Found]) -> None:
    """Remove everything of a stage folder but its lease folder (links are removed, never followed)."""
    url = store.stage_url(sweep, run_id, stage)
    local = rundir.local_path(url)
    if local is not None:
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(local):
                if entry.name == lease.LEASE_DIR:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        return
    fs, base = rundir.filesystem(sweep)
    mine = [f.path for f in files if (p := f.parts)[:2] == [run_id, stage] and p[2:3] != [lease.LEASE_DIR]]
    if mine:
        fs.rm([f"{str(base).rstrip('/')}/{p}" for p in mine])


def remove_tree(url: str) -> None:
    """Remove a folder and everything below it (nothing when it is not there)."""
    local = rundir.local_path(url)
    if local is not None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(local)
        return
    fs, path = rundir.filesystem(url)
    fs.invalidate_cache(path)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path, recursive=True)


def write_manifest_without(sweep: str, run_ids: set[str]) -> None:
    """Write the sweep's manifest without these runs and their job records (parts first, then the index naming
    them); Unreadable when the stored manifest cannot be read."""
    manifest = store.read_manifest(sweep)
    if manifest is None:
        return
    runs = [r for r in manifest.get("runs", []) if r.get("run_id") not in run_ids]
    jobs = {k: j for k, j in manifest.get("jobs", {}).items() if k.partition("/")[0] not in run_ids}
    parts = store.manifest_parts(runs, jobs)
    for name, text in parts.items():
        rundir.write_text_atomic(rundir.join(sweep, store.PARTS, name), text)
    index = {k: v for k, v in manifest.items() if k not in ("runs", "jobs")}
    rundir.write_json(rundir.join(sweep, store.MANIFEST), {**index, "parts": list(parts)})
