"""The run store reconciled with the backends: what a stage's status.json says, corrected by what its backend says.

A stage's own process writes its status.json (running, completed, failed, preempted). What it cannot write is
what happened to it from outside: a job cancelled while it waited, killed by the cluster, or gone altogether.
First the stage's lease (`extrema.run.lease`): while a live attempt holds it, the stage is running, whatever its
status.json says (a sweep driver killed with -9 leaves its local stages running, and they are shown so); a
damaged lease record counts as expired and is listed as unreadable. A pending
record without a job id whose submission was interrupted (the submitting process is gone) is marked `stuck`, so
that the next `sweep` submits it again. Then, for every other stage the store shows pending, running or preempted,
the backend that holds its job is asked (by `squeue`/`sacct`, the Ray job API or the PID of a local sweep; the
submitting process is not needed), and:

- pending/running there: shown as such (a preempted stage that Slurm requeued is pending again);
- ended there while the store still shows it in flight: recorded failed (failed, or completed without a result)
  or cancelled, with the reason; a failed job's lost nodes (a rank 0 whose node went away cannot record the
  failure: the surviving ranks' ending records name it; Slurm's NODE_FAIL names the nodes it marks down) are
  named in the error and recorded as the stage's bad nodes (`extrema.run.bad_nodes`);
- unknown there (the job vanished, or the local Ray head that ran it has stopped): recorded cancelled, so that
  the next `sweep` resumes it;
- the backend cannot be asked (no address, unreachable): the store's word stands, and a note says so;
- queued or run by a local sweep of another host (`elsewhere`): the store's word stands; that sweep may be gone,
  so a backend whose jobs wait on the lease follows the stage (`adopt`), as it follows a running attempt.

Stages are asked in groups, one per backend and cluster (`launch.backends.base.in_flight_groups`), each through
its backend's `states`.

Corrections are written to status.json (only when `write`), never over a terminal state the stage wrote itself.
A store that refuses the first write (mounted read-only, no permission, full) gets no more: the corrections are
shown, and one note says they were not recorded.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from extrema.run import bad_nodes, contract, lease, rank_progress
from extrema.run.contract import StageState, os_reason
from launch import logs
from launch.backends.base import State, Unreachable, backend_class, in_flight_groups, recorded_class
from launch.runstore import store
from launch.sweepfile.model import LauncherSpec

ENDED = (State.COMPLETED, State.FAILED, State.CANCELLED, State.UNKNOWN)


@dataclass
class Reconciled:
    """Each job key's state after asking the backends, and notes on backends that could not be asked."""

    states: dict[str, str | None]
    notes: list[str] = field(default_factory=list)
    corrected: dict[str, str] = field(default_factory=dict)  # key -> error recorded with the corrected state
    holders: dict[str, lease.Holder] = field(default_factory=dict)  # key -> the live attempt that owns the stage
    stuck: set[str] = field(default_factory=set)  # pending without a job: the submission was interrupted
    elsewhere: set[str] = field(default_factory=set)  # in flight in a sweep of another host, unseen from here
    problems: list[str] = field(default_factory=list)  # `path: reason` of lease records that cannot be read


def settled(seen: State | None, backend: str, job_id: str) -> tuple[StageState | None, str]:
    """The state an in-flight stage is in by its backend's answer (None: keep the store's), and why it ended."""
    if seen in (State.PENDING, State.PREEMPTED):
        return StageState.PENDING, ""
    if seen == State.RUNNING:
        return StageState.RUNNING, ""
    if seen == State.COMPLETED:
        return StageState.FAILED, f"{backend} job {job_id} ended without recording a result"
    if seen == State.FAILED:
        return StageState.FAILED, f"{backend} job {job_id} failed"
    if seen == State.CANCELLED:
        return StageState.CANCELLED, f"{backend} job {job_id} was cancelled"
    if seen == State.UNKNOWN:
        return (
            StageState.CANCELLED,
            f"{backend} job {job_id} is unknown to the cluster: it vanished or ended unrecorded",
        )
    return None, ""


def with_reason(
    why: str, stage: str, status: Mapping[str, Any], launcher: LauncherSpec, manifest: Mapping[str, Any] | None
) -> str:
    """`why` a job failed, with the one-line reason its logs end with where they have one (a refused code
    snapshot: the job stopped before the stage could record anything)."""
    try:
        said = logs.last_said(logs.sources(stage, status, manifest, launcher))
    except Exception:  # the logs cannot be listed: the backend's word stands alone
        said = None
    return f"{why}: {said}" if said else why


def ask(
    name: str, address: str | None, launcher: LauncherSpec, manifest: Mapping[str, Any] | None, job_ids: list[str]
) -> tuple[dict[str, State] | None, str]:
    """The backend's states of its jobs, or None and the reason when it cannot be asked."""
    try:
        return backend_class(name).states(launcher, address, manifest, job_ids), ""
    except Unreachable as e:
        return None, f"{name}: {e}"
    except Exception as e:
        where = f" at {address}" if address else ""
        return None, f"{name}{where}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def failed_nodes(name: str, address: str | None, launcher: LauncherSpec, job_ids: list[str]) -> dict[str, list[str]]:
    """Of these failed jobs, the nodes their backend saw fail under them (job id -> nodes); {} when it cannot say."""
    if not job_ids:
        return {}
    try:
        return backend_class(name).lost_nodes(launcher, address, job_ids)
    except Exception:  # the failure stands without the nodes
        return {}


def named_lost(stage: str, status: Mapping[str, Any], down: list[str], why: str) -> tuple[list[str], str]:
    """The nodes a failed job lost, and `why` naming them: those its surviving ranks saw go (their ending records
    since the attempt started: rank 0's node among them, whose rank could not record the failure), then those the
    backend saw fail."""
    since = status.get("started_at") or status.get("submitted_at") or 0.0
    seen, line = rank_progress.lost_peers(stage, float(since))
    more = [n for n in down if n not in seen]
    words = [why, *([line] if line else []), *([failed_under(stage, more)] if more else [])]
    return [*seen, *more], "; ".join(words)


def failed_under(stage: str, nodes: list[str]) -> str:
    """Words naming nodes that failed under a job and the ranks of its last attempt they ran (provenance)."""
    try:
        ranks = (contract.read_record(contract.StageDir(stage).provenance) or {}).get("ranks") or []
    except (contract.Unreadable, OSError):
        ranks = []
    lost = [f"rank {r.get('rank')} on {r.get('host')}" for r in ranks if r.get("host") in nodes]
    return f"node(s) {', '.join(nodes)} failed under it" + (f": {', '.join(lost[:8])} lost" if lost else "")


def requeued(status: Mapping[str, Any], seen: State | None) -> bool:
    """Whether the backend queued again the job of a stage whose attempt was running and ended unrecorded (its
    lease is free: the caller asks only then), as Slurm requeues a job whose node failed."""
    return seen in (State.PENDING, State.PREEMPTED) and status.get("state") == StageState.RUNNING


def note_requeued(stage: str, status: Mapping[str, Any], job: str, down: list[str]) -> list[dict[str, Any]]:
    """Record a requeued stage pending, its error naming the nodes its attempt lost (the surviving ranks' ending
    records: rank 0's node among them) and those as bad nodes; the stage's bad nodes now ([] when no rank or
    backend named one: nothing is written)."""
    lost, why = named_lost(stage, status, down, f"{job} was queued again after its attempt ended unrecorded")
    if not lost or lease.live_holder(stage) is not None:
        return []
    named = bad_nodes.added(stage, lost, f"lost under {job}: {why.split('; ', 1)[-1]}", time.time())
    contract.update_status(stage, state=StageState.PENDING, error=why, **named)
    return list(named[bad_nodes.FIELD])


def avoid_requeued(
    name: str, address: str | None, launcher: LauncherSpec, key: str, job_id: str, named: list[dict[str, Any]]
) -> str | None:
    """Keep a requeued job off its stage's bad nodes through its backend; what was done, or why not, in a line."""
    try:
        return backend_class(name).avoid(launcher, address, job_id, store.split_key(key)[1], named)
    except Exception as e:  # the record stands; the next submission avoids them
        return f"{key}: could not keep {name} job {job_id} off its bad nodes: {type(e).__name__}: {e}"


def in_flight(status: Mapping[str, Any]) -> bool:
    """Whether the run store shows the stage pending, running or preempted."""
    return status.get("state") in contract.IN_FLIGHT


def retried(status: Mapping[str, Any]) -> bool:
    """Whether a stage recorded failed may still be retried by its own job (`retries_in_job` backends): the
    backend is asked, and a job still running means the stage is."""
    if status.get("state") != StageState.FAILED:
        return False
    backend = recorded_class(status.get("backend"))
    return backend is not None and backend.retries_in_job


def reconcile(
    sweep_url: str,
    statuses: Mapping[str, Mapping[str, Any]],
    launcher: LauncherSpec,
    manifest: Mapping[str, Any] | None = None,
    write: bool = False,
) -> Reconciled:
    """Each job's state from the run store, corrected by its backend for jobs the store shows in flight."""
    out = Reconciled({k: s.get("state") for k, s in statuses.items()})
    refused: str | None = None  # why the store would not take the first correction: no more are tried
    unrecorded = 0
    asked: dict[str, Mapping[str, Any]] = {}
    for key, s in statuses.items():
        if s.get("state") in (None, StageState.COMPLETED, store.UNREADABLE):
            continue
        stage = store.stage_url(sweep_url, *store.split_key(key))
        holder = lease.current(stage)
        if holder is not None and holder.damage is not None:
            out.problems.append(f"{holder.url}: {holder.damage}")
        elif holder is not None and holder.why_free() is None:
            out.states[key], out.holders[key] = StageState.RUNNING, holder
            continue
        if store.interrupted_submission(s):
            out.stuck.add(key)
            continue
        if in_flight(s) or retried(s):
            asked[key] = s
    for (name, address), ids in in_flight_groups(asked, launcher).items():
        answer, note = ask(name, address, launcher, manifest, list(ids.values()))
        if answer is None:
            out.notes.append(f"could not ask {note}; {len(ids)} stage(s) show the run store's state")
            continue
        # Only stages the store shows in flight are recorded below: only their jobs' nodes are asked for.
        ended = [
            i
            for k, i in ids.items()
            if in_flight(statuses[k]) and (answer.get(i) == State.FAILED or requeued(statuses[k], answer.get(i)))
        ]
        down = failed_nodes(name, address, launcher, ended)
        for key, job_id in ids.items():
            if answer.get(job_id) == State.ELSEWHERE:
                out.elsewhere.add(key)
            state, why = settled(answer.get(job_id), name, job_id)
            if state is None:
                continue
            if retried(statuses[key]) and not in_flight(statuses[key]):
                if state in (StageState.RUNNING, StageState.PENDING):  # the attempt failed; its job is trying again
                    out.states[key] = state
                continue
            if write and refused is None and requeued(statuses[key], answer.get(job_id)):
                stage = store.stage_url(sweep_url, *store.split_key(key))
                try:
                    named = note_requeued(stage, statuses[key], f"{name} job {job_id}", down.get(job_id, []))
                except OSError as e:
                    refused, named = f"{os_reason(e, path=False)}: {stage}", []
                said = avoid_requeued(name, address, launcher, key, job_id, named) if named else None
                out.notes += [said] if said else []
            if state in contract.TERMINAL:
                stage = store.stage_url(sweep_url, *store.split_key(key))
                now = store.read_status(stage).get("state")  # the stage may have ended since it was read
                if now in contract.TERMINAL:
                    state = now
                else:
                    lost: list[str] = []
                    if state == StageState.FAILED:
                        why = with_reason(why, stage, statuses[key], launcher, manifest)
                        lost, why = named_lost(stage, statuses[key], down.get(job_id, []), why)
                    out.corrected[key] = why
                    if write and refused is None:
                        try:
                            reason = f"lost under {name} job {job_id}: {why.split('; ', 1)[-1]}"
                            store.record_ended(stage, state, why, **bad_nodes.added(stage, lost, reason, time.time()))
                        except OSError as e:
                            refused = f"{os_reason(e, path=False)}: {stage}"
                    if write and refused is not None:
                        unrecorded += 1
            out.states[key] = state
    if refused is not None:
        note = f"the run store takes no writes here ({refused}): {unrecorded} correction(s) shown, not recorded"
        out.notes.append(note)
    return out
