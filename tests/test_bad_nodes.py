"""Bad nodes excluded on retry, and rank 0's node lost (issue #30, points 4 and 5).

Unit tests: which named nodes a job avoids while it stays runnable, arrays split by their exclusion, the records a
failure leaves. On the two-node Slurm cluster (`slurm_two_nodes`): a one-node stage whose rank is SIGSTOPped fails
naming its node and the retry runs on the other node (`--exclude`), equal to the reference bit for bit; rank 0's
node killed mid-run is named by the surviving rank, and the retry, which cannot exclude a node of a two-node job on
two nodes, resumes equal. On the two-node Ray cluster: an attempt whose rank hung names its node, and the retry
inside the same Ray job is placed off it, equal to the reference.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from extrema.run import bad_nodes, contract, rank_progress
from launch.backends.base import Job
from launch.backends.resources import ResourcesSpec
from launch.backends.slurm.backend import SlurmBackend, parse_partition_nodes
from launch.backends.slurm.plan import planned_arrays
from launch.reconcile import named_lost
from tests import test_multinode
from tests.cluster_sweeps import cli, release_requeued
from tests.clusters.ray_nodes import RayNodes
from tests.clusters.slurm_nodes import USABLE, SlurmNodes
from tests.multinode_runs import STEPS, TWO_NODES, only_run, slurm_sweep
from tests.multinode_runs import sweep_file as multinode_sweep_file
from tests.test_multinode import (
    assert_equal_models,
    ckpt_steps,
    job_logs,
    status_of,
    wait_for,
    wait_mid_run,
    wait_state,
)

# The CLI on the two-node cluster (the reference, `one_node_two_processes`, is the session's: tests.multinode_runs).
on_two_node_slurm = test_multinode.on_two_node_slurm


def entry(node: str, at: float, reason: str = "hung") -> dict[str, Any]:
    return {"node": node, "reason": reason, "at": at}


def test_the_most_recently_named_nodes_are_avoided_while_the_job_stays_runnable() -> None:
    named = [entry("n1", 1), entry("n3", 3), entry("n2", 2)]
    four = ["n1", "n2", "n3", "n4"]
    assert bad_nodes.avoided(named, four, 1) == (["n1", "n2", "n3"], [])
    assert bad_nodes.avoided(named, four, 2) == (["n2", "n3"], ["n1"])  # n1, named first, is kept
    assert bad_nodes.avoided(named, four, 4) == ([], ["n3", "n2", "n1"])
    assert bad_nodes.avoided(named, ["n1", "n2"], 2) == ([], ["n2", "n1"])
    assert bad_nodes.avoided(named, ["n2", "n4"], 1) == (["n2"], [])  # n1, n3: not the job's partition's
    assert bad_nodes.avoided(named, None, 8) == (["n1", "n2", "n3"], [])  # the cluster did not say: all of them
    line = bad_nodes.kept_line("slurm: r1/pretrain", ["n1"], ["n1", "n2"], 2)
    assert (
        line == "slurm: r1/pretrain: not avoiding bad node(s) n1: the job needs 2 of 2 node(s) and must stay runnable"
    )


def test_a_node_named_again_moves_to_the_end_and_the_record_parses() -> None:
    entries = bad_nodes.merged([entry("n1", 1), entry("n2", 2)], ["n1"], "lost", 5)
    assert [(e["node"], e["reason"]) for e in entries] == [("n2", "hung"), ("n1", "lost")]
    assert len(bad_nodes.merged([], [f"n{i}" for i in range(100)], "x", 1)) == bad_nodes.MAX_KEPT
    doc = {"state": "failed", "bad_nodes": entries}
    assert contract.parse_record("status.json", json.dumps(doc).encode()) == doc
    with pytest.raises(contract.Unreadable, match="bad_nodes"):
        contract.parse_record("status.json", json.dumps({"bad_nodes": [{"reason": "no node"}]}).encode())


def job(run: str, stage: str = "pretrain", **kw: Any) -> Job:
    return Job(f"{run}/{stage}", f"/runs/sw/{run}", stage, (), ResourcesSpec(partition="two", **kw))


def test_jobs_of_one_array_share_their_exclusion() -> None:
    jobs = [job(f"r{i}") for i in range(5)]
    exclude = {"r1/pretrain": ["n2"], "r3/pretrain": ["n2"], "r4/pretrain": ["n1", "n2"]}
    arrays = planned_arrays(jobs, 10, exclude)
    assert [keys for keys, _ in arrays] == [
        ["r0/pretrain", "r2/pretrain"],
        ["r1/pretrain", "r3/pretrain"],
        ["r4/pretrain"],
    ]
    assert len(planned_arrays(jobs, 10)) == 1
    assert parse_partition_nodes("n1|two*\nn2|two*\nn3|big\nn1|big\n", None) == ["n1", "n2"]
    assert parse_partition_nodes("n1|two*\nn2|two*\nn3|big\nn1|big\n", "big") == ["n3", "n1"]


def test_the_nodes_surviving_ranks_lost_name_the_failure(tmp_path: Path) -> None:
    stage = str(tmp_path)
    note = "collective between ranks failed on rank 1 (n2); ranks on other nodes: rank 0 on n1 (...): boom"
    rank_progress.write_ending(stage, 1, "n2", "7", rank_progress.Lost(["n1"], ["rank 0 on n1"], note))
    lost, why = named_lost(stage, {"started_at": time.time() - 5}, ["n1", "n3"], "slurm job 7 failed")
    assert lost == ["n1", "n3"]
    assert why == f"slurm job 7 failed; rank 0 on n1 lost, as rank 1 on n2 saw it: {note}; node(s) n3 failed under it"
    assert named_lost(stage, {"started_at": time.time() + 5}, [], "x") == ([], "x")  # an earlier attempt's record
    assert sorted(rank_progress.read_all(stage)) == []  # not a progress record


# --- on the two-node Slurm cluster ------------------------------------------------------------------------------

HANG_S = 6  # seen before the collective times out (COLLECTIVE_S), which would name the node too
COLLECTIVE_S = 30


def stop_rank_1_after_step_3(run: Path, timeout_s: float) -> rank_progress.RankRecord:
    """SIGSTOP rank 1 of the two-rank stage once both ranks are past step 3 and a checkpoint is saved; its record."""
    stage = str(run / "pretrain")

    def both_ranks_past_step_3() -> bool:
        recs = rank_progress.read_all(stage)
        return recs.keys() == {0, 1} and min(r.step for r in recs.values()) >= 4 and any(ckpt_steps(run).values())

    wait_for(both_ranks_past_step_3, timeout_s, "both ranks past step 3 and a checkpoint")
    stopped = rank_progress.read_all(stage)[1]
    os.kill(int(stopped.pid or 0), signal.SIGSTOP)
    return stopped


def submitted_script(tmp_path: Path, job_id: str) -> str:
    """The sbatch script submitit sent for a job."""
    (script,) = (tmp_path / "runs").rglob(f"{job_id}_submission.sh")
    return script.read_text()


def status_json(path: Path) -> list[dict[str, Any]]:
    """`status --json` of the sweep."""
    _, out = cli("status", str(path), "--json")
    return list(json.loads(out[out.index("\n[") + 1 :] if not out.startswith("[") else out))


@pytest.mark.slurm
def test_slurm_a_hung_rank_names_its_node_and_the_retry_on_one_node_excludes_it(
    on_two_node_slurm: SlurmNodes, tmp_path: Path
) -> None:
    """A rank of a two-node stage SIGSTOPped: the stage fails naming it and its node, which `status` lists; the
    retry on one node (the cluster's nodes have one CPU each: a stage of two ranks on one node cannot be asked for)
    is sent with `--exclude` of that node and ends on the other, resumed from the hung attempt's checkpoint."""
    cluster = on_two_node_slurm
    resources = {**TWO_NODES, "hang_timeout_s": HANG_S, "collective_timeout_s": COLLECTIVE_S}
    path, run = slurm_sweep(tmp_path, cluster, resources)
    stopped = stop_rank_1_after_step_3(run, 150)
    try:
        took = wait_for(lambda: status_of(run).get("state") == "failed", HANG_S + 15, "the stage recorded hung")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(stopped.pid or 0), signal.SIGKILL)
    status = status_of(run)
    print(f"\nhung rank 1 on {stopped.host}: failed after {took:.1f} s: {status['error'][:300]}")
    assert f"rank 1 on {stopped.host} (pid {stopped.pid})" in status["error"]
    assert [e["node"] for e in status["bad_nodes"]] == [stopped.host]
    assert wait_state(path, run, {"failed"}, 60, tmp_path) == "failed"
    _, out = cli("status", str(path))
    assert f"bad nodes, avoided on retry: {stopped.host} (rank 1 (pid {stopped.pid}) hung at step " in out, out
    assert status_json(path)[0]["bad_nodes"] == [stopped.host]

    code, out = cli("sweep", str(path), "--retry-failed", "launcher.resources.nodes=1")
    assert code == 0, out
    assert f"#SBATCH --exclude={stopped.host}\n" in submitted_script(tmp_path, str(status_of(run)["job_id"]))
    assert wait_state(path, run, {"completed", "failed"}, 180, tmp_path) == "completed", job_logs(tmp_path)
    other = ({"n1", "n2"} - {stopped.host}).pop()
    assert status_of(run)["hosts"] == [other] and status_of(run)["attempts"] == 2
    assert max(ckpt_steps(run)) == STEPS


@pytest.mark.slurm
def test_slurm_rank_0s_node_lost_is_named_by_the_survivor_and_the_retry_resumes_equal(
    on_two_node_slurm: SlurmNodes,
    one_node_two_processes: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cluster = on_two_node_slurm
    # Rank 0 holds the stage's lease and goes with its node: the lease is free once its heartbeat is this old.
    monkeypatch.setenv("EXTREMA_LEASE_TTL_S", "10")
    path, run = slurm_sweep(tmp_path, cluster, TWO_NODES)
    wait_mid_run(run, 120)
    assert cluster.kill_node("n1")
    said: list[str] = []
    try:
        # Slurm ends the job NODE_FAIL and queues it again; rank 0 could record nothing: the surviving rank 1 names
        # its node (when it ended by itself, not with the job), else Slurm's failed node does, with its rank.
        took = wait_for(lambda: bool(named_in_status(path, run, said)), 90, "status to name the lost node")
        status = status_of(run)
        with capsys.disabled():
            print(f"\nrank 0's node lost: named after {took:.1f} s, {status['state']}: {status['error'][:400]}")
        assert status["state"] == "pending", status  # Slurm queued the job again: its next attempt
        assert "rank 0 on n1 lost" in status["error"], status["error"]
        assert named_in_status(path, run, said) == ["n1"]
        # The requeued job cannot avoid n1 (two nodes of two), and `status` says so, once.
        job_id = str(status["job_id"])
        kept = [o for o in said if f"slurm job {job_id}: not avoiding bad node(s) n1: the job needs 2 of 2 node" in o]
        assert len(kept) == 1, said
        assert f"bad nodes, avoided on retry: n1 (lost under slurm job {job_id}: " in said[-1], said[-1]
    finally:
        if cluster.node_state("n1") not in USABLE:
            cluster.start_node("n1")
    assert max(s for s, done in ckpt_steps(run).items() if done) < STEPS
    # A submission would not avoid it either (asked of the cluster as `submit` asks).
    resources = ResourcesSpec(**TWO_NODES, partition=cluster.partition)
    assert SlurmBackend().exclusions([Job(f"{run.name}/pretrain", str(run), "pretrain", (), resources)]) == {
        f"{run.name}/pretrain": []
    }
    err = capsys.readouterr().err
    assert f"slurm: {run.name}/pretrain: not avoiding bad node(s) n1: the job needs 2 of 2 node(s)" in err, err
    release_requeued(cluster.run, job_id)
    assert wait_state(path, run, {"completed"}, 180, tmp_path) == "completed", job_logs(tmp_path)
    assert status_of(run)["attempts"] == 2
    assert_equal_models(run, one_node_two_processes)


@pytest.mark.slurm
def test_slurm_a_one_node_job_queued_again_after_its_node_failed_avoids_it(
    on_two_node_slurm: SlurmNodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-node stage whose node dies: Slurm ends the job NODE_FAIL and queues it again; `status` names the node,
    keeps the requeued job off it (ExcNodeList), and the stage resumes on the other node even with the node back."""
    cluster = on_two_node_slurm
    monkeypatch.setenv("EXTREMA_LEASE_TTL_S", "10")
    path, run = slurm_sweep(tmp_path, cluster, {**TWO_NODES, "nodes": 1})
    wait_mid_run(run, 120)
    (node,) = status_of(run)["hosts"]
    assert cluster.kill_node(node)
    said: list[str] = []
    try:
        took = wait_for(lambda: bool(named_in_status(path, run, said)), 90, "status to name the lost node")
        status = status_of(run)
        print(f"\none-node job's node lost: named after {took:.1f} s, {status['state']}: {status['error'][:300]}")
        assert status["state"] == "pending", status
        assert f"node(s) {node} failed under it: rank 0 on {node} lost" in status["error"], status["error"]
        job_id = str(status["job_id"])
        assert any(f"slurm job {job_id}, queued again, avoids bad node(s) {node}" in o for o in said), said
        shown = cluster.run("scontrol", "-o", "show", "job", job_id).stdout
        assert f"ExcNodeList={node} " in shown, shown
    finally:
        if cluster.node_state(node) not in USABLE:
            cluster.start_node(node)
    release_requeued(cluster.run, job_id)
    assert wait_state(path, run, {"completed"}, 180, tmp_path) == "completed", job_logs(tmp_path)
    other = ({"n1", "n2"} - {node}).pop()
    assert status_of(run)["hosts"] == [other] and status_of(run)["attempts"] == 2
    assert max(ckpt_steps(run)) == STEPS


def named_in_status(path: Path, run: Path, said: list[str]) -> list[str]:
    """The bad nodes of the stage once `status` (which records what the backend saw) has named them; what status
    said goes to `said`."""
    said.append(cli("status", str(path))[1])
    return [e["node"] for e in status_of(run).get("bad_nodes") or []]


@pytest.mark.ray
def test_ray_a_retry_inside_the_job_is_placed_off_the_node_its_attempt_named(
    ray_two_nodes: RayNodes, one_node_two_processes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-node stage of two ranks under Ray Train: rank 1 SIGSTOPped, the watchdog ends the attempt naming its
    node; the driver's own retry, in the same Ray job, reads the stage's bad nodes again and places the ranks on
    the other node, resumed from the checkpoint and equal to one node with two processes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    resources = {**TWO_NODES, "nodes": 1, "processes_per_node": 2, "hang_timeout_s": HANG_S}
    resources["collective_timeout_s"] = COLLECTIVE_S
    launcher = {"backend": "ray", "ray_address": ray_two_nodes.address, "resources": resources}
    path = multinode_sweep_file(tmp_path / "mn.yaml", tmp_path / "runs", launcher)
    code, out = cli("sweep", str(path))
    assert code == 0, out
    run = only_run(tmp_path / "runs")
    stopped = stop_rank_1_after_step_3(run, 180)
    try:
        wait_for(lambda: bool(status_of(run).get("bad_nodes")), HANG_S + 15, "the hang to name the node")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(stopped.pid or 0), signal.SIGKILL)
    assert wait_state(path, run, {"completed", "failed"}, 300, tmp_path) == "completed", status_of(run)
    other = ({"n1", "n2"} - {stopped.host}).pop()
    assert json.loads((run / "pretrain" / "provenance.json").read_text())["hosts"] == [other]
    assert status_of(run)["attempts"] == 2
    _, logs = cli("logs", str(tmp_path / "runs" / "mn"), "--run", run.name, "--stage", "pretrain")
    assert f"launch.backends.ray: pretrain avoids bad node(s) {stopped.host}" in logs, logs[-3000:]
    assert_equal_models(run, one_node_two_processes)
