"""`python -m extrema.entry <run-dir-url> <stage>`: run one stage of one run. The only thing any backend executes.

Takes the stage's lease (`extrema.run.lease`; waiting while another live attempt owns the stage), then reads
`<run-dir>/<stage>/spec.json` (a RunSpec), records provenance and status beside it, runs the stage function and
writes `result.json`. A stage that an earlier attempt completed is not run again. Every commit (status, result,
checkpoint) is fenced by the lease. Exit codes (`extrema.run.contract`): 0 done, 1 failed, 2 bad invocation or spec,
3 preempted (a checkpoint was saved: requeue and it resumes), 4 the lease was lost (nothing committed).

`--processes N` runs N CPU ranks of one node, forked from this process after one import of the stage
(`extrema.train.local_ranks`): what torchrun --standalone does, at one import of torch instead of N + 1 (GPU ranks
keep torchrun: CUDA cannot be used in a child forked after its driver was initialised).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import re
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from extrema.run import bad_nodes, code_snapshot, contract, lease, provenance, rank_progress, rundir
from extrema.run.attempt import Attempt
from extrema.spec import STAGE_BY_NAME, RunSpec
from extrema.train import trackers, watchdog

StageFn = Callable[[RunSpec, str, Attempt], dict[str, Any]]

EXIT_REQUEUE = contract.EXIT_REQUEUE  # the stage saved a checkpoint after a preemption signal: requeue it


COLLECTIVE_ERROR = re.compile(r"gloo|nccl|timed out|connection (?:reset|closed|refused)|broken pipe", re.IGNORECASE)
JOB_ID_VARS = ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "RAY_JOB_SUBMISSION_ID", "EXTREMA_JOB_ID")


def stage_fn(stage: str) -> StageFn:
    """The `run(spec, stage_dir, attempt)` function of a stage, imported on demand."""
    if stage not in STAGE_BY_NAME:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGE_BY_NAME)}")
    fn: StageFn = importlib.import_module(STAGE_BY_NAME[stage].module).run
    return fn


def now() -> float:
    """Wall-clock timestamp in seconds."""
    return time.time()


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


def take_stage(stage_dir: str) -> lease.Lease:
    """This attempt's lease on the stage, waiting (and saying so once) while another live attempt owns it."""
    job_id = job_id_from_env()
    got = lease.try_acquire(stage_dir, job_id)
    if isinstance(got, lease.Holder):
        print(f"extrema.entry: {stage_dir} is owned by {got.describe()}; waiting for it", file=sys.stderr, flush=True)
        got = lease.acquire(stage_dir, job_id, wait=True)
    assert isinstance(got, lease.Lease)
    got.start_heartbeat()
    return got


def completed_result(stage_dir: str) -> dict[str, Any] | None:
    """The result of an earlier attempt that completed the stage, or None when it must run."""
    try:
        if contract.read_status(stage_dir).get("state") != contract.StageState.COMPLETED:
            return None
        return contract.read_record(rundir.join(stage_dir, contract.RESULT))
    except contract.Unreadable:
        return None


def nccl_possible() -> bool:
    """Whether this process may use NCCL (a GPU is visible to it), without importing torch."""
    return os.environ.get("CUDA_VISIBLE_DEVICES", "unset") not in ("", "-1") and os.path.exists("/dev/nvidiactl")


def flight_recorder(stage_dir: str) -> None:
    """NCCL's flight-recorder dumps (on a collective timeout) go to the stage directory when it is on a filesystem
    (`flight_recorder/rank_<r>`); elsewhere torch's default place (/tmp/nccl_trace_rank_<r>) on each node."""
    path = rundir.local_path(stage_dir)
    if path is None or "TORCH_FR_DUMP_TEMP_FILE" in os.environ:
        return
    folder = os.path.join(path, contract.FLIGHT_RECORDER_DIR)
    with contextlib.suppress(OSError):  # not writable: torch's default place
        os.makedirs(folder, exist_ok=True)
        os.environ["TORCH_FR_DUMP_TEMP_FILE"] = os.path.join(folder, "rank_")


def agree(decision: bool, world: int) -> bool:
    """Rank 0's decision, on every rank (a broadcast when several processes run the stage)."""
    if world == 1:
        return decision
    import torch

    from extrema.train.dist import init_world, wait_for_all

    device = init_world().device
    # Rank 0 may wait long for the lease, another rank to start: each waits in the store, not in the broadcast.
    wait_for_all("extrema/stage-owned")
    flag = torch.tensor([1.0 if decision else 0.0], device=device)
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item() > 0)


class CollectiveFailed(RuntimeError):
    """A collective between the ranks of a stage failed or timed out: a peer, its node or the link is gone.
    `nodes`: the nodes of the ranks on other nodes than this one (those the failure names), `peers` those ranks
    ("rank 0 on n1")."""

    def __init__(self, note: str, nodes: list[str], peers: list[str]) -> None:
        super().__init__(note)
        self.nodes, self.peers = nodes, peers


def places(world: int) -> list[dict[str, Any]]:
    """Every rank's host and pid, in rank order (gathered across ranks when there are several)."""
    if world == 1:
        return [contract.this_process()]
    from extrema.train.dist import rank_places

    return rank_places()


def is_collective_failure(e: BaseException) -> bool:
    """Whether an exception (or one it chains) is a failed or timed-out collective."""
    import torch.distributed as dist

    for c in contract.chain(e):
        if isinstance(c, dist.DistError) or (isinstance(c, RuntimeError) and COLLECTIVE_ERROR.search(str(c))):
            return True
    return False


def host_of(ranks: list[dict[str, Any]], rank: int) -> str:
    """The node a rank runs on (this one's when the list does not say)."""
    return str(next((r["host"] for r in ranks if r["rank"] == rank), socket.gethostname()))


def on_other_nodes(ranks: list[dict[str, Any]], rank: int) -> list[dict[str, Any]]:
    """The ranks whose node is not this rank's."""
    mine = host_of(ranks, rank)
    return [r for r in ranks if r["host"] != mine]


def lost_to(e: BaseException, ranks: list[dict[str, Any]], rank: int) -> CollectiveFailed:
    """A failed collective, naming the ranks on other nodes than this rank's and their nodes."""
    remote = on_other_nodes(ranks, rank)
    nodes = list(dict.fromkeys(str(r["host"]) for r in remote))
    return CollectiveFailed(peer_note(e, ranks, rank), nodes, [f"rank {r['rank']} on {r['host']}" for r in remote])


def peer_note(e: BaseException, ranks: list[dict[str, Any]], rank: int) -> str:
    """What failed and where the other ranks ran, so that the record names the node that went away."""
    mine = host_of(ranks, rank)
    others = [r for r in ranks if r["rank"] != rank]
    remote = on_other_nodes(ranks, rank)
    shown = ", ".join(f"rank {r['rank']} on {r['host']}" for r in (remote or others)[:8])
    where = "on other nodes" if remote else "on this node"
    timeout = contract.collective_timeout_s()
    return (
        f"collective between ranks failed on rank {rank} ({mine}); ranks {where}: {shown} "
        f"(a node, a rank or the link to it went away; collective timeout {timeout:g} s): {contract.describe_error(e)}"
    )


def code_changes(stage_dir: str, current: dict[str, Any]) -> list[dict[str, Any]]:
    """The stage's code-change record for this attempt; CodeChanged when it would resume checkpoints another
    snapshot wrote without EXTREMA_ALLOW_CODE_CHANGE."""
    from extrema.train import ckpt

    try:
        previous = contract.read_record(contract.StageDir(stage_dir).provenance)
    except contract.Unreadable:
        previous = None
    has_checkpoint = ckpt.latest_step(contract.StageDir(stage_dir).checkpoints) is not None
    allowed = os.environ.get(code_snapshot.ALLOW_CHANGE_ENV, "") not in ("", "0")
    return code_snapshot.changes_on_resume(previous, current, has_checkpoint, allowed, now())


def note_trackers(stage_dir: str, fence: lease.Fence, disabled: dict[str, str]) -> None:
    """Record in the stage's status which trackers this attempt disabled, and why."""
    commit_status(stage_dir, fence, trackers={name: f"disabled: {why}" for name, why in disabled.items()})


def fence_of(held: lease.Lease | None) -> lease.Fence:
    """The fence of this process's commits: its lease's, or none when it holds no lease (ranks other than 0)."""
    return held.fence if held is not None else lease.unfenced


def commit_status(stage_dir: str, fence: lease.Fence, **fields: Any) -> dict[str, Any] | None:
    """Write status fields if `fence` passes (this process still owns the stage, or holds no lease); None when it
    lost the stage."""
    try:
        fence(f"status {fields.get('state', '')}")
    except lease.LeaseLost as e:
        print(f"extrema.entry: not recording {fields.get('state')}: {e}", file=sys.stderr, flush=True)
        return None
    return contract.update_status(stage_dir, **fields)


def ending(e: BaseException | None) -> tuple[str, int]:
    """The outcome an attempt ended with (recorded in its lease) and the process's exit code."""
    if e is None:
        return contract.StageState.COMPLETED, contract.EXIT_OK
    if isinstance(e, lease.LeaseLost):
        return "lease lost", contract.EXIT_LEASE_LOST
    if isinstance(e, contract.Preempted):
        return contract.StageState.PREEMPTED, contract.EXIT_REQUEUE
    if isinstance(e, KeyboardInterrupt):
        return contract.StageState.CANCELLED, contract.EXIT_INTERRUPTED
    return contract.StageState.FAILED, contract.EXIT_FAILED


def record_end(stage_dir: str, e: BaseException, fence: lease.Fence) -> None:
    """Record in status.json how an attempt ended by an exception (fenced: not when the lease was lost)."""
    state, _ = ending(e)
    if isinstance(e, lease.LeaseLost):
        return
    if isinstance(e, KeyboardInterrupt):
        error = "interrupted"
    elif isinstance(e, contract.Preempted):
        error = str(e)
    else:
        error = contract.describe_error(e)  # torch's CheckpointException and others derive from BaseException
    at = now()
    named = bad_nodes.added(stage_dir, e.nodes, "a collective failed", at) if isinstance(e, CollectiveFailed) else {}
    commit_status(stage_dir, fence, state=state, finished_at=at, error=error, **named)


def leave_ending(stage_dir: str, failed: CollectiveFailed, ranks: list[dict[str, Any]], rank: int) -> None:
    """This rank's account of its failed collective (`rank_progress.write_ending`): rank 0, which records the
    stage's status, may be the rank that went away."""
    try:
        lost = rank_progress.Lost(failed.nodes, failed.peers, str(failed))
        rank_progress.write_ending(stage_dir, rank, host_of(ranks, rank), job_id_from_env(), lost)
    except Exception as e:  # the store does not answer: the backend's view stands alone
        print(f"extrema.entry: rank {rank}: ending record not written: {e}", file=sys.stderr, flush=True)


def run_stage(run_dir: str, stage: str) -> dict[str, Any]:
    """Run one stage from its spec.json, recording status, provenance and the result (rank 0 holds the lease
    for the whole attempt, records how it ended, and releases the lease with that outcome)."""
    stage_dir = contract.StageDir.of(run_dir, stage).url
    rank, world = world_info()
    outcome: str = contract.StageState.FAILED  # or 'lease lost'
    mine: lease.Lease | None = None
    try:
        spec = read_spec(stage_dir, stage)
        if world > 1 and nccl_possible():
            flight_recorder(stage_dir)
        if rank == 0:
            mine = take_stage(stage_dir)
        result = attempt(spec, stage_dir, mine)
        outcome = contract.StageState.COMPLETED
        return result
    except SystemExit:
        raise
    except BaseException as e:
        lost = taken_over(mine, e)
        outcome = ending(lost or e)[0]
        if rank == 0 and lost is None:
            record_end(stage_dir, e, fence_of(mine))
        if lost is not None:
            raise lost from e
        raise
    finally:
        if mine is not None:
            mine.release(outcome)


def taken_over(mine: lease.Lease | None, e: BaseException) -> lease.LeaseLost | None:
    """The LeaseLost behind an attempt's failure when another attempt took the stage over meanwhile: a frozen attempt
    that writes on fails on what its successor changed (a step directory it pruned) and must end as a lost lease,
    not as the stage's failure."""
    if mine is None or isinstance(e, lease.LeaseLost):
        return None
    try:
        mine.check_superseded()
    except lease.LeaseLost as lost:
        return lost
    except Exception:  # the store does not answer: the failure stands as it is
        return None
    return None


def read_spec(stage_dir: str, stage: str) -> RunSpec:
    """The stage's spec.json, checked to be this stage's."""
    raw = contract.read_record(contract.StageDir(stage_dir).spec)
    if raw is None:
        raise FileNotFoundError(f"no spec.json in {stage_dir}")
    spec = RunSpec.model_validate(raw)
    if spec.stage != stage:
        raise ValueError(f"{stage_dir}/spec.json is for stage {spec.stage!r}, not {stage!r}")
    if stage not in STAGE_BY_NAME:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(STAGE_BY_NAME)}")
    return spec


def attempt(spec: RunSpec, stage_dir: str, mine: lease.Lease | None) -> dict[str, Any]:
    """One attempt at a stage whose lease rank 0 holds (`mine`): run it unless an earlier attempt completed it,
    write the result."""
    stage = spec.stage
    rank, world = world_info()
    fence = fence_of(mine)
    done: dict[str, Any] | None = None
    if rank == 0:
        done = completed_result(stage_dir)
    if agree(done is not None, world):
        print(f"extrema.entry: {stage_dir} was completed by an earlier attempt; not run again", file=sys.stderr)
        return done or {}
    fn = stage_fn(stage)  # imported once this attempt owns the stage: a waiting attempt stays light
    from extrema.data.workers import start_worker_server  # imported by every stage: costs nothing more now

    start_worker_server(spec.experiment.data.num_workers)
    ranks = places(world)
    if world > 1:
        print(f"extrema.entry: rank {rank} of {world} on {socket.gethostname()} (pid {os.getpid()}): {stage_dir}",
              file=sys.stderr, flush=True)  # fmt: skip
    if rank == 0:
        try:
            prev = contract.read_status(stage_dir)
        except contract.Unreadable as e:  # replaced below by this attempt's record, which notes the damage
            print(f"extrema.entry: {e}", file=sys.stderr, flush=True)
            prev = {}
        info = provenance.provenance(world, ranks)
        info["code_changes"] = code_changes(stage_dir, info)
        fence("provenance")
        rundir.write_json(contract.StageDir(stage_dir).provenance, info)
        commit_status(
            stage_dir,
            fence,
            state=contract.StageState.RUNNING,
            attempts=int(prev.get("attempts", 0) or 0) + 1,
            lease_generation=mine.generation if mine else None,
            started_at=now(),
            finished_at=None,
            error=None,
            trackers=None,
            host=info["host"],
            hosts=info["hosts"],
            code=info.get("code") or info.get("code_source"),
            pid=os.getpid(),
            job_id=job_id_from_env() or prev.get("job_id"),
        )
    try:
        note = functools.partial(note_trackers, stage_dir, fence)
        with (
            watchdog.started(stage_dir, rank, ranks, mine),
            trackers.opened(spec, stage_dir, note) if rank == 0 else contextlib.nullcontext() as mirror,
        ):
            result = fn(spec, stage_dir, Attempt(fence, mirror))
    except Exception as e:
        if world > 1 and is_collective_failure(e):
            failed = lost_to(e, ranks, rank)
            leave_ending(stage_dir, failed, ranks, rank)
            raise failed from e
        raise
    if rank == 0:
        fence("result")
        rundir.write_json(rundir.join(stage_dir, contract.RESULT), result)
        commit_status(stage_dir, fence, state=contract.StageState.COMPLETED, finished_at=now())
    return result


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m extrema.entry", description=__doc__)
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="CPU ranks on this node, forked from this process after one import of the stage (instead of torchrun; "
        "GPU ranks: torchrun)",
    )
    parser.add_argument("run_dir", help="run directory URL: <root>/<sweep>/<run-id>")
    parser.add_argument("stage", choices=sorted(STAGE_BY_NAME))
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if args.processes == 1:
        return run_checked(args.run_dir, args.stage)
    from extrema.train import dist, local_ranks

    stage_fn(args.stage)  # imported once, here, before the ranks are forked
    body = functools.partial(run_checked, args.run_dir, args.stage)
    return local_ranks.run_ranks(args.processes, body, dist.collective_timeout())


def run_checked(run_dir: str, stage: str) -> int:
    """Run the stage in this process (one rank) when its spec exists; the exit code."""
    stage_dir = rundir.join(run_dir, stage)
    if not rundir.exists(contract.StageDir(stage_dir).spec):
        print(f"extrema.entry: no spec.json in {stage_dir}", file=sys.stderr)
        return contract.EXIT_USAGE
    code = contract.EXIT_OK
    try:
        run_stage(run_dir, stage)
    except SystemExit:
        raise
    except BaseException as e:
        state, code = ending(e)
        if isinstance(e, lease.LeaseLost):
            print(f"extrema.entry: {e}; this attempt stops without committing", file=sys.stderr, flush=True)
        elif state == contract.StageState.FAILED:
            traceback.print_exc()
    finally:
        release_process_group()
    return code


def release_process_group() -> None:
    """Destroy the process groups, if any, and join their gloo threads while the interpreter is whole: a gloo thread
    left to interpreter teardown can abort the process ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from extrema.train.dist import release_world

        release_world()


if __name__ == "__main__":
    # Run the imported module, not __main__, so stages raising `extrema.run.contract.Preempted` are caught here.
    from extrema import entry

    sys.exit(entry.main())
