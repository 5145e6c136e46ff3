"""A Slurm job's logs as submitit keeps them in the sweep's log folder: `<job id>_<rank>_log.out` and `.err`, rank
by rank (job ids are `<array>_<index>` or `<id>`; requeued attempts append to the same files), each line labelled
with its node and rank."""

from __future__ import annotations

import re
from collections.abc import Callable

from extrema.run import rundir
from launch.backends.slurm.plan import JOB_ID

SLURM_LOG = r"_(\d+)_log\.(out|err)"
SUBMITIT_START = re.compile(r"Starting with JobEnvironment\(job_id=[^,]*, hostname=([^,\s]+),")


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
