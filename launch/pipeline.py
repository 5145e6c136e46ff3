"""Planning, pure: runs -> stage jobs with `after` edges, and which of them a submission should send."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from extrema.run import contract
from extrema.run.contract import StageState
from launch.backends.base import Job
from launch.runstore import store
from launch.sweepfile.model import STAGE_ORDER, LauncherSpec, Run, needs_pretrain


def upstream(run: Run, stage: str) -> tuple[str, ...]:
    """Stages of the same run that `stage` waits for: pretrain, unless it has its own checkpoint or a random init."""
    if stage == "pretrain" or "pretrain" not in run.stages or not needs_pretrain(run.experiment, stage):
        return ()
    return ("pretrain",)


def plan(runs: Sequence[Run], launcher: LauncherSpec, sweep_url: str) -> list[Job]:
    """Every stage job of the runs, stage-major (all pretrain jobs, then each downstream stage), run order within."""
    dirs = {run.run_id: store.run_url(sweep_url, run.run_id) for run in runs}
    resources = {stage: launcher.resources_for(stage) for stage in STAGE_ORDER}
    jobs = []
    for stage in STAGE_ORDER:
        for run in runs:
            if stage in run.stages:
                jobs.append(
                    Job(
                        key=store.job_key(run.run_id, stage),
                        run_dir=dirs[run.run_id],
                        stage=stage,
                        after=tuple(f"{run.run_id}/{s}" for s in upstream(run, stage)),
                        resources=resources[stage],
                    )
                )
    return jobs


@dataclass(frozen=True)
class Decision:
    """What a submission does with one job, and why."""

    job: Job
    state: str | None
    submit: bool
    reason: str


def select(
    jobs: Sequence[Job],
    states: Mapping[str, str | None],
    retry_failed: bool = False,
    stuck: Collection[str] = (),
    adopt: Collection[str] = (),
) -> list[Decision]:
    """Submit what is neither completed nor in flight (failed ones only when retrying) and whose upstream will run.

    `stuck`: pending keys whose submission was interrupted (submitted again). `adopt`: running keys that this
    submission follows (its job waits for the attempt that owns the stage and ends with it, so their downstream
    stages can be planned); the stage is never run twice, its lease sees to that. Unreadable stages are held back.
    """
    chosen: set[str] = set()
    out = []
    for job in jobs:
        state = states.get(job.key)
        if state == StageState.COMPLETED:
            out.append(Decision(job, state, False, "completed"))
            continue
        if state == store.UNREADABLE:
            out.append(Decision(job, state, False, "held back: its record is unreadable (see below)"))
            continue
        if job.key in adopt:
            chosen.add(job.key)
            whose = "the running attempt" if state == StageState.RUNNING else "the attempt another host's sweep queued"
            out.append(Decision(job, state, True, f"adopt: follow {whose}"))
            continue
        if state in contract.IN_FLIGHT and job.key not in stuck:
            out.append(Decision(job, state, False, f"already {state}"))
            continue
        if state == StageState.FAILED and not retry_failed:
            out.append(Decision(job, state, False, "failed; --retry-failed resubmits it"))
            continue
        blocked = [a for a in job.after if a not in chosen and states.get(a) != StageState.COMPLETED]
        if blocked:
            waits = ", ".join(f"{a} ({states.get(a) or 'not submitted'})" for a in blocked)
            out.append(Decision(job, state, False, f"waits for {waits}"))
            continue
        chosen.add(job.key)
        if job.key in stuck:
            reason = "submission was interrupted"
        else:
            reasons: dict[str | None, str] = {None: "new", StageState.FAILED: "retry", StageState.CANCELLED: "resume"}
            reason = reasons.get(state, f"resubmit ({state})")
        out.append(Decision(job, state, True, reason))
    return out
