"""What `sweep --dry-run` shows beyond the plan's rows: the resources each distinct job shape asks of its backend,
the sbatch scripts a Slurm submission would send (rendered by the Slurm backend's own planning, no cluster needed),
and the whole plan as one JSON document."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from extrema.run import code_snapshot, rundir
from launch.backends.base import Job, backend_class
from launch.backends.resources import ResourcesSpec
from launch.pipeline import Decision
from launch.runstore import roots, store
from launch.runstore import snapshot as snapshots
from launch.sweepfile.model import LauncherSpec
from launch.views import tables

MAX_ARRAY_SIZE = 1001  # Slurm's default MaxArraySize: a dry run asks no cluster (a submission reads the real one)
SHAPE_FIELDS = ("nodes", "processes_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "time_min", "partition")


def shapes(decisions: Sequence[Decision]) -> list[dict[str, Any]]:
    """One record per distinct resource shape of the planned jobs: its stages, how many jobs (and how many are to be
    submitted), and what each job asks (SHAPE_FIELDS, account, qos, constraint)."""
    out: dict[str, dict[str, Any]] = {}
    for d in decisions:
        r: ResourcesSpec = d.job.resources
        key = r.model_dump_json()
        if key not in out:
            asked = r.model_dump(mode="json", include={*SHAPE_FIELDS, "account", "qos", "constraint"})
            out[key] = {"stages": [], "jobs": 0, "submit": 0, **asked, "gpus": r.nodes * r.gpus_per_node}
        row = out[key]
        row["jobs"] += 1
        row["submit"] += int(d.submit)
        if d.job.stage not in row["stages"]:
            row["stages"].append(d.job.stage)
    return list(out.values())


def show_shapes(out: Console, rows: Sequence[dict[str, Any]]) -> None:
    """The resources table: one row per distinct shape, as the backend would ask for each job."""
    columns = [
        "stages",
        "jobs",
        "submit",
        "nodes",
        "procs/node",
        "GPUs/node",
        "GPUs",
        "CPUs/task",
        "mem",
        "time",
        "partition",
    ]
    cells = [
        (
            ", ".join(r["stages"]),
            str(r["jobs"]),
            str(r["submit"]),
            str(r["nodes"]),
            str(r["processes_per_node"]),
            str(r["gpus_per_node"]),
            str(r["gpus"]),
            str(r["cpus_per_task"]),
            "-" if r["mem_gb"] is None else f"{r['mem_gb']:g} GB",
            f"{r['time_min']} min",
            r["partition"] or "-",
        )
        for r in rows
    ]
    tables.show(out, "resources per job, as the backend would ask", columns, cells)


def planned_code_dir(snapshot_id: str, url: str, launcher: LauncherSpec, log_dir: str) -> str:
    """The directory the jobs of this submission would import its code snapshot from (`cli.sweep.store_snapshot`'s
    choice, computed without storing anything)."""
    local = rundir.local_path(rundir.join(snapshots.code_url(url, snapshot_id), code_snapshot.FILES))
    if local is not None:
        return str(local)
    on_log_dir = backend_class(launcher.backend).shared_log_dir and not roots.is_local(url)
    cache = Path(log_dir.split("://", 1)[-1]) / "code" if on_log_dir else snapshots.default_cache()
    return str(cache / snapshot_id)


def sbatch_scripts(jobs: Sequence[Job], launcher: LauncherSpec, log_dir: str) -> list[dict[str, Any]]:
    """The sbatch script of every array a Slurm submission of `jobs` would send, in order, with its job keys and
    dependency (stand-in job ids 1, 2, ...; arrays split at MAX_ARRAY_SIZE). Nothing is submitted."""
    from launch.backends.slurm.backend import SlurmBackend  # submitit: only where scripts are shown
    from launch.backends.slurm.plan import log_folder, planned_arrays

    backend = SlurmBackend.from_launcher(launcher)
    folder = log_folder(log_dir)
    by_key = {j.key: j for j in jobs}
    out = []
    for keys, dependency in planned_arrays(jobs, MAX_ARRAY_SIZE):
        chunk = [by_key[k] for k in keys]
        out.append({"jobs": keys, "dependency": dependency, "script": backend.script(chunk, dependency, folder)})
    return out


def show_scripts(out: Console, scripts: Sequence[dict[str, Any]]) -> None:
    """Each sbatch script under a line naming its array."""
    for i, s in enumerate(scripts, start=1):
        after = f", {s['dependency']}" if s["dependency"] else ""
        out.print(Text(f"# sbatch script {i} of {len(scripts)}: {len(s['jobs'])} job(s){after}", style="bold"))
        out.print(s["script"], markup=False, highlight=False, soft_wrap=True)


def plan_json(
    sweep: str, url: str, backend: str, decisions: Sequence[Decision], runs: Sequence[store.StoredRun]
) -> dict[str, Any]:
    """The plan as `sweep --dry-run --json` prints it: the sweep, each job with its swept values, state and action,
    and the resource shapes."""
    by_id = {r.run_id: r.overrides for r in runs}
    jobs = []
    for d in decisions:
        run_id, stage = store.split_key(d.job.key)
        jobs.append(
            {
                "run": run_id,
                "stage": stage,
                "overrides": by_id.get(run_id, {}),
                "state": None if d.state is None else str(d.state),
                "submit": d.submit,
                "reason": d.reason,
                "after": list(d.job.after),
                "resources": d.job.resources.model_dump(mode="json"),
            }
        )
    return {
        "sweep": sweep,
        "url": url,
        "backend": backend,
        "runs": len(runs),
        "jobs": jobs,
        "submit": sum(d.submit for d in decisions),
        "resources": shapes(decisions),
    }
