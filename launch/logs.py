"""Where a stage's logs are and how to read them, whichever backend ran it.

- the files in `<run-dir>/<stage>/logs/`: the local backend's `local.log` (appended across attempts), and the
  `ray-<job id>.log` copies a sweep saves there before it stops the local Ray head it started;
- a Slurm job's submitit files in the sweep's log folder: `<job id>_<rank>_log.out` and `.err`, rank by rank
  (job ids are `<array>_<index>` or `<id>`; requeued attempts append to the same files);
- a Ray job's driver log (the stage's output included), read through the cluster's job API.

Each source reads from an offset, so that `extrema-launch logs --follow` prints only what is new.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from extrema import rundir
from launch import store

SLURM_JOB_ID = re.compile(r"\d+(?:_\d+)?")  # as launch.backends.slurm checks them, without importing submitit
SLURM_LOG = r"_(\d+)_log\.(out|err)"


@dataclass(frozen=True)
class LogSource:
    """One log: a name to show and a reader of its bytes from an offset."""

    name: str
    read: Callable[[int], bytes]


def file_source(url: str) -> LogSource:
    """A log file on any fsspec URL."""

    def read(offset: int) -> bytes:
        fs, path = rundir.filesystem(url)
        with fs.open(path, "rb") as f:
            f.seek(offset)
            data: bytes = f.read()
        return data

    return LogSource(url, read)


def slurm_files(log_dir: str, job_id: str) -> list[str]:
    """The submitit stdout/stderr files of one Slurm job or array task, rank 0 first, .out before .err."""
    if not SLURM_JOB_ID.fullmatch(job_id):
        return []
    fs, path = rundir.filesystem(log_dir)
    pattern = re.compile(re.escape(job_id) + SLURM_LOG)
    found = []
    for p in fs.glob(f"{path}/{job_id}_*_log.*"):
        m = pattern.fullmatch(p.rsplit("/", 1)[-1])
        if m:
            found.append((int(m.group(1)), m.group(2) == "err", p))
    return [fs.unstrip_protocol(p) if "://" in log_dir else p for *_, p in sorted(found)]


def ray_source(address: str, job_id: str) -> LogSource:
    """The driver log of a Ray job, fetched whole from the job API on each read."""
    from launch.backends.ray import RayBackend

    backend = RayBackend(address)
    return LogSource(f"ray job {job_id} at {address}", lambda offset: backend.logs(job_id).encode()[offset:])


def ray_log_name(job_id: str) -> str:
    """The name under which a Ray job's log is kept in the stage's `logs/` directory."""
    return f"ray-{store.safe_name(job_id, 'job id')}.log"


def sources(
    stage_dir: str, status: Mapping[str, Any], manifest: Mapping[str, Any] | None, ray_address: str | None
) -> list[LogSource]:
    """Every log of a stage: its `logs/` files, then those of its current Slurm or Ray job."""
    found = store.log_files(stage_dir)
    out = [file_source(u) for u in found]
    job_id, backend = str(status.get("job_id") or ""), status.get("backend")
    log_dir = (manifest or {}).get("log_dir")
    if backend == "slurm" and job_id and isinstance(log_dir, str):
        out += [file_source(u) for u in slurm_files(log_dir, job_id)]
    if backend == "ray" and job_id and ray_address and not any(u.endswith("/" + ray_log_name(job_id)) for u in found):
        out.append(ray_source(ray_address, job_id))
    return out


def save_ray_log(stage_dir: str, address: str, job_id: str) -> None:
    """Copy a Ray job's log into the stage's `logs/` directory (before the cluster that keeps it goes away)."""
    from launch.backends.ray import RayBackend

    rundir.write_text_atomic(rundir.join(stage_dir, "logs", ray_log_name(job_id)), RayBackend(address).logs(job_id))
