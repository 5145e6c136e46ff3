"""`python -m extrema.entry <run-dir-url> <stage>`: run one stage of one run. The only thing any backend executes.

Reads `<run-dir>/<stage>/spec.json` (a RunSpec), records provenance and status beside it, runs the stage
function and writes `result.json`. Exit codes: 0 done, 1 failed, 2 bad invocation or spec,
3 preempted (a checkpoint was saved: requeue and it resumes).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from extrema import rundir
from extrema.spec import RunSpec

StageFn = Callable[[RunSpec, str], dict[str, Any]]
STAGE_MODULES: dict[str, str] = {
    "pretrain": "extrema.stages.pretrain",
    "knn": "extrema.stages.knn",
    "probe": "extrema.stages.probe",
    "finetune": "extrema.stages.finetune",
    "detect": "extrema.stages.detect",
    "inpaint": "extrema.stages.inpaint",
}

EXIT_REQUEUE = 3  # the stage saved a checkpoint after a preemption signal: requeue it, it resumes


class Preempted(Exception):
    """Raised by a stage that stopped at a preemption signal after saving a checkpoint."""


JOB_ID_VARS = ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "RAY_JOB_SUBMISSION_ID", "EXTREMA_JOB_ID")


def stage_fn(stage: str) -> StageFn:
    """The `run(spec, stage_dir)` function of a stage, imported on demand."""
    if stage not in STAGE_MODULES:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGE_MODULES)}")
    fn: StageFn = importlib.import_module(STAGE_MODULES[stage]).run
    return fn


def now() -> float:
    """Wall-clock timestamp in seconds."""
    return time.time()


def update_status(stage_dir: str, **fields: Any) -> dict[str, Any]:
    """Merge fields into `<stage_dir>/status.json` (atomic write) and return the new status."""
    url = rundir.join(stage_dir, "status.json")
    status = rundir.read_json(url) or {}
    status.update(fields)
    rundir.write_json(url, status)
    return status


def job_id_from_env() -> str | None:
    """The backend's job id, when the process runs under one."""
    for var in JOB_ID_VARS:
        if os.environ.get(var):
            task = os.environ.get("SLURM_ARRAY_TASK_ID")
            return f"{os.environ[var]}_{task}" if var == "SLURM_ARRAY_JOB_ID" and task else os.environ[var]
    return None


def world_info() -> tuple[int, int]:
    """(rank, world_size) from the launcher's environment; (0, 1) for a plain process."""
    for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and size_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[size_var])
    return 0, 1


def run_stage(run_dir: str, stage: str) -> dict[str, Any]:
    """Run one stage from its spec.json, recording status, provenance and the result."""
    stage_dir = rundir.join(run_dir, stage)
    raw = rundir.read_json(rundir.join(stage_dir, "spec.json"))
    if raw is None:
        raise FileNotFoundError(f"no spec.json in {stage_dir}")
    spec = RunSpec.model_validate(raw)
    if spec.stage != stage:
        raise ValueError(f"{stage_dir}/spec.json is for stage {spec.stage!r}, not {stage!r}")
    fn = stage_fn(stage)
    rank, world = world_info()
    if rank == 0:
        prev = rundir.read_json(rundir.join(stage_dir, "status.json")) or {}
        rundir.write_json(rundir.join(stage_dir, "provenance.json"), rundir.provenance(world))
        update_status(
            stage_dir,
            state="running",
            attempts=int(prev.get("attempts", 0)) + 1,
            started_at=now(),
            finished_at=None,
            error=None,
            host=rundir.provenance(world)["host"],
            pid=os.getpid(),
            job_id=job_id_from_env() or prev.get("job_id"),
        )
    result = fn(spec, stage_dir)
    if rank == 0:
        rundir.write_json(rundir.join(stage_dir, "result.json"), result)
        update_status(stage_dir, state="completed", finished_at=now())
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m extrema.entry", description=__doc__)
    parser.add_argument("run_dir", help="run directory URL: <root>/<sweep>/<run-id>")
    parser.add_argument("stage", choices=sorted(STAGE_MODULES))
    args = parser.parse_args(argv)
    stage_dir = rundir.join(args.run_dir, args.stage)
    if not rundir.exists(rundir.join(stage_dir, "spec.json")):
        print(f"extrema.entry: no spec.json in {stage_dir}", file=sys.stderr)
        return 2
    is_main = world_info()[0] == 0
    try:
        run_stage(args.run_dir, args.stage)
    except Preempted as e:
        if is_main:
            update_status(stage_dir, state="preempted", finished_at=now(), error=str(e))
        return EXIT_REQUEUE
    except KeyboardInterrupt:
        if is_main:
            update_status(stage_dir, state="cancelled", finished_at=now(), error="interrupted")
        return 130
    except Exception as e:
        traceback.print_exc()
        if is_main:
            update_status(stage_dir, state="failed", finished_at=now(), error=f"{type(e).__name__}: {e}")
        return 1
    finally:
        release_process_group()
    return 0


def release_process_group() -> None:
    """Destroy the default process group, if any, while the interpreter is whole: gloo threads left to interpreter
    teardown can abort the process ("terminate called without an active exception") after a finished stage."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    # Run the imported module, not __main__, so stages raising `extrema.entry.Preempted` are caught here.
    from extrema import entry

    sys.exit(entry.main())
