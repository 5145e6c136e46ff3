"""Two real nodes: FSDP2 pretraining across the nodes of a two-node Slurm and a two-node Ray cluster (fixtures
`slurm_two_nodes` and `ray_two_nodes`), and the faults users meet first: preemption of the two-node job, a node
killed mid-run, the link to a node cut mid-run, a Ray worker node lost. Every run ends equal, bit for bit, to the
same stage run on one node with two processes (the local backend under torchrun): same world size, same gloo
reduction order, one thread per rank.

The tests drive the CLI as users do (`sweep`, `status`, `logs`, `sweep --retry-failed`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from extrema.run import rundir
from extrema.train import ckpt
from launch.addressed import open_addressed
from launch.runstore import store
from launch.views.status_view import status_table
from tests.cluster_sweeps import cli, release_requeued
from tests.clusters.ray_nodes import RayNodes
from tests.clusters.slurm_nodes import USABLE, SlurmNodes
from tests.multinode_runs import COLLECTIVE_TIMEOUT_S, STEPS, TWO_NODES, only_run, slurm_sweep, sweep_file
from tests.stage_runs import checkpointed_model, shard_ranks

LEASE_TTL_S = 10


def status_of(run: Path) -> dict[str, Any]:
    """The pretrain stage's status record."""
    return dict(store.read_status(str(run / "pretrain")))


def steps_logged(run: Path) -> int:
    """The last step the pretrain stage logged."""
    return max((r.get("step", 0) for r in rundir.read_jsonl(str(run / "pretrain" / "metrics.jsonl"))), default=0)


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll until `check` holds; the seconds it took. Fails naming `what` after timeout_s."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout_s, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.2)
    return time.monotonic() - t0


def entry_pids(pids: list[int]) -> list[int]:
    """Those of the PIDs that run `extrema.entry` (a rank of a stage)."""
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd or b"extrema.entry" in cmd or any(b"train_worker" in c for c in cmd):
            out.append(pid)
    return out


def assert_equal_models(run: Path, reference: Path) -> None:
    """The final checkpoints of two runs hold bitwise-equal model tensors."""
    a, b = checkpointed_model(run / "pretrain"), checkpointed_model(reference / "pretrain")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture
def on_two_node_slurm(slurm_two_nodes: SlurmNodes, monkeypatch: pytest.MonkeyPatch) -> SlurmNodes:
    """The CLI and its jobs talk to the two-node cluster; one thread per rank, as in the reference."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_two_nodes.conf))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return slurm_two_nodes


def job_logs(tmp_path: Path) -> str:
    """The tails of every submitit log of the sweep, for failure messages."""
    files = sorted((tmp_path / "runs").rglob("*_log.*"))
    return "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in files)


def wait_state(path: Path, run: Path, states: set[str], timeout_s: float, tmp_path: Path) -> str:
    """Ask what `status` shows (the run store reconciled with the backend) until the stage is in one of `states`;
    that state. A stage whose attempt failed while its Ray job retries shows running, as it is."""
    seen: dict[str, str] = {}
    key = f"{run.name}/pretrain"

    def reached() -> bool:
        seen["state"] = str(status_table(open_addressed(str(path), None)).seen.states.get(key))
        return seen["state"] in states

    try:
        wait_for(reached, timeout_s, f"state in {sorted(states)}")
    except AssertionError as e:
        raise AssertionError(f"{e}; last state {seen.get('state')}\n{job_logs(tmp_path)}") from None
    return seen["state"]


@pytest.mark.slurm
def test_slurm_fsdp_across_two_nodes_preempted_stops_both_at_one_step_and_resumes_equal_to_one_node(
    on_two_node_slurm: SlurmNodes, one_node_two_processes: Path, tmp_path: Path
) -> None:
    """FSDP across two Slurm nodes: `status` shows the running stage on both nodes; preempted (USR2), both nodes
    stop at one step with one checkpoint; the requeued job resumes and ends equal, bit for bit, to one node with two
    processes; its provenance places rank 0 on n1 and rank 1 on n2, and `logs` tags every line with node and rank."""
    cluster = on_two_node_slurm
    path, run = slurm_sweep(tmp_path, cluster)
    job_id = str(status_of(run)["job_id"])
    wait_for(lambda: "n1, n2" in cli("status", str(path))[1], 120, "status to show the stage on nodes n1, n2")
    wait_for(lambda: steps_logged(run) >= 3, 120, "step 3")
    cluster.run("scancel", "--signal=USR2", job_id)
    wait_for(
        lambda: cluster.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.startswith("PENDING"),
        90,
        "the job to be requeued",
    )
    stopped = status_of(run)
    assert stopped["state"] == "preempted", stopped
    saved = [s for s, complete in ckpt_steps(run).items() if complete]
    assert saved and 3 <= max(saved) < STEPS
    step_dir = run / "pretrain" / "ckpt" / f"step-{max(saved)}"
    assert (step_dir / ".metadata").exists() and shard_ranks(step_dir) == {0, 1}  # both nodes stopped here and saved
    release_requeued(cluster.run, job_id)
    assert wait_state(path, run, {"completed", "failed"}, 180, tmp_path) == "completed", job_logs(tmp_path)
    assert status_of(run)["attempts"] == 2
    assert_equal_models(run, one_node_two_processes)
    prov = json.loads((run / "pretrain" / "provenance.json").read_text())
    assert prov["world_size"] == 2 and prov["hosts"] == ["n1", "n2"]
    assert [(r["rank"], r["host"]) for r in prov["ranks"]] == [(0, "n1"), (1, "n2")]
    assert status_of(run)["hosts"] == ["n1", "n2"]
    code, out = cli("logs", str(tmp_path / "runs" / "mn"), "--run", run.name, "--stage", "pretrain")
    assert code == 0, out
    for node, rank in (("n1", 0), ("n2", 1)):
        tagged = [line for line in out.splitlines() if line.startswith(f"[{node} rank {rank}] ")]
        assert any("Starting with JobEnvironment" in line for line in tagged), out[-3000:]
        assert any(f"extrema.entry: rank {rank} of 2 on {node}" in line for line in tagged), out[-3000:]

    def history() -> list[str]:
        return cluster.run("sacct", "-X", "-D", "-n", "-P", "-o", "JobID,State", "-j", job_id).stdout.split()

    wait_for(lambda: history()[-1:] != [f"{job_id}|RUNNING"], 30, "accounting to record the job's end")
    assert history() == [f"{job_id}|REQUEUED", f"{job_id}|COMPLETED"]


def ckpt_steps(run: Path) -> dict[int, bool]:
    """Checkpoint steps of the pretrain stage -> complete."""
    return ckpt.list_steps(str(run / "pretrain" / "ckpt"))


def wait_mid_run(run: Path, timeout_s: float) -> None:
    """Wait until the stage has a complete checkpoint and has gone past it (step 7, checkpoints every 5)."""
    wait_for(lambda: any(ckpt_steps(run).values()) and steps_logged(run) >= 7, timeout_s, "a checkpoint and step 7")


def retry_to_the_end(path: Path, run: Path, reference: Path, tmp_path: Path) -> None:
    """`sweep --retry-failed`, then the stage completes equal to the reference."""
    code, out = cli("sweep", str(path), "--retry-failed")
    assert code == 0, out
    assert wait_state(path, run, {"completed", "failed"}, 180, tmp_path) == "completed", job_logs(tmp_path)
    assert_equal_models(run, reference)


@pytest.mark.slurm
def test_slurm_node_lost_mid_run_fails_naming_it_then_the_retry_resumes_equal(
    on_two_node_slurm: SlurmNodes, one_node_two_processes: Path, tmp_path: Path
) -> None:
    cluster = on_two_node_slurm
    path, run = slurm_sweep(tmp_path, cluster)
    wait_mid_run(run, 120)
    killed = cluster.kill_node("n2")
    assert killed
    took = wait_for(lambda: status_of(run).get("state") == "failed", 60, "the stage to be recorded failed")
    error = str(status_of(run)["error"])
    assert "rank 1 on n2" in error, error
    print(f"node lost: failed after {took:.1f} s: {error[:300]}")
    assert wait_state(path, run, {"failed"}, 60, tmp_path) == "failed"
    resumed_from = max(s for s, complete in ckpt_steps(run).items() if complete)
    assert resumed_from < STEPS

    cluster.start_node("n2")
    retry_to_the_end(path, run, one_node_two_processes, tmp_path)
    assert status_of(run)["attempts"] == 2


@pytest.mark.slurm
def test_slurm_link_cut_mid_run_ends_every_rank_within_the_timeout_then_the_retry_resumes_equal(
    on_two_node_slurm: SlurmNodes, one_node_two_processes: Path, tmp_path: Path
) -> None:
    cluster = on_two_node_slurm
    path, run = slurm_sweep(tmp_path, cluster)
    wait_mid_run(run, 120)
    ranks = {n: entry_pids(cluster.net.pids(n)) for n in ("n1", "n2")}
    assert ranks["n1"] and ranks["n2"], ranks
    cluster.cut("n2")
    try:
        took = wait_for(lambda: status_of(run).get("state") == "failed", COLLECTIVE_TIMEOUT_S + 30, "failed")
        error = str(status_of(run)["error"])
        assert "rank 1 on n2" in error and "timed out" in error.lower(), error
        print(f"link cut: failed after {took:.1f} s: {error[:300]}")
        # Behind the cut, rank 1 gives up after the same timeout: no rank waits for a collective past it.
        wait_for(lambda: not entry_pids(cluster.net.pids("n2")), COLLECTIVE_TIMEOUT_S + 30, "rank 1 to exit")
    finally:
        cluster.restore("n2")
    assert wait_state(path, run, {"failed"}, 90, tmp_path) == "failed"
    if cluster.node_state("n2") not in USABLE:
        cluster.start_node("n2")
    retry_to_the_end(path, run, one_node_two_processes, tmp_path)


@pytest.fixture
def on_two_node_ray(ray_two_nodes: RayNodes, monkeypatch: pytest.MonkeyPatch) -> Iterator[RayNodes]:
    """The CLI talks to the two-node Ray cluster; one thread per rank, as in the reference."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # A lost node's attempt cannot be asked whether it lives: its lease is free once its heartbeat is this old.
    monkeypatch.setenv("EXTREMA_LEASE_TTL_S", str(LEASE_TTL_S))
    yield ray_two_nodes


def ray_sweep(tmp_path: Path, cluster: RayNodes) -> tuple[Path, Path]:
    """Submit the two-node sweep to the Ray cluster; (sweep file, run directory)."""
    launcher = {"backend": "ray", "ray_address": cluster.address, "resources": TWO_NODES}
    path = sweep_file(tmp_path / "mn.yaml", tmp_path / "runs", launcher)
    code, out = cli("sweep", str(path))
    assert code == 0, out
    return path, only_run(tmp_path / "runs")


@pytest.mark.ray
def test_ray_worker_node_lost_mid_run_retries_from_the_checkpoint_and_ends_equal(
    on_two_node_ray: RayNodes, one_node_two_processes: Path, tmp_path: Path
) -> None:
    """FSDP across two Ray nodes, the worker node killed mid-run and started again: the retry resumes from the
    checkpoint and ends equal, bit for bit, to one node with two processes; `logs` tags lines with node and rank."""
    cluster = on_two_node_ray
    path, run = ray_sweep(tmp_path, cluster)
    wait_mid_run(run, 180)
    assert cluster.kill_worker_node()
    time.sleep(2)
    cluster.start_worker_node()
    state = wait_state(path, run, {"completed", "failed"}, 300, tmp_path)
    if state != "completed":
        print(cli("logs", str(tmp_path / "runs" / "mn"), "--run", run.name, "--stage", "pretrain")[1])
    assert state == "completed", status_of(run)
    assert status_of(run)["attempts"] == 2
    assert_equal_models(run, one_node_two_processes)
    prov = json.loads((run / "pretrain" / "provenance.json").read_text())
    assert prov["world_size"] == 2 and sorted(prov["hosts"]) == ["n1", "n2"]
    code, out = cli("logs", str(tmp_path / "runs" / "mn"), "--run", run.name, "--stage", "pretrain")
    assert code == 0, out
    for r in prov["ranks"]:  # the last attempt's ranks, each line tagged with its node and rank
        mine = f"[{r['host']} rank {r['rank']}] extrema.entry: rank {r['rank']} of 2 on {r['host']}"
        assert any(line.startswith(mine) for line in out.splitlines()), out[-3000:]
