"""Multi-node launcher settings without a cluster: rendezvous address, placement, network environment, and the
node and rank named on every log line."""

from __future__ import annotations

from pathlib import Path

import pytest

from extrema import entry
from extrema.run import contract
from launch.backends.base import Job, network_env
from launch.backends.log_source import Lines, rank_hosts
from launch.backends.ray.backend import job_runtime_env, placement
from launch.backends.ray.logs import ray_label
from launch.backends.resources import ResourcesSpec
from launch.backends.slurm.backend import rendezvous_address
from launch.backends.slurm.logs import slurm_label, slurm_rank


def test_rendezvous_is_the_first_nodes_address_and_never_loopback_across_nodes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here: no NodeAddr to fall back on
    assert rendezvous_address("10.77.5.11", 2) == "10.77.5.11"
    assert rendezvous_address("localhost", 1) == "127.0.0.1"
    with pytest.raises(RuntimeError, match=r"no rendezvous address reachable from other nodes for localhost"):
        rendezvous_address("localhost", 2)


def test_placement_spreads_one_worker_per_node() -> None:
    assert placement(1, 4) == "PACK"
    assert placement(2, 2) == "STRICT_SPREAD"
    assert placement(2, 8) == "SPREAD"


def test_network_settings_reach_every_rank_through_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTREMA_LEASE_TTL_S", "10")
    monkeypatch.setenv("EXTREMA_JOB_ID", "mine")
    for var in contract.NCCL_ENV:
        monkeypatch.delenv(var, raising=False)
    r = ResourcesSpec(nodes=2, network_interface="eth0", collective_timeout_s=45)
    env = network_env(r)
    nccl = {
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "2",
        "TORCH_FR_BUFFER_SIZE": "2000",
        "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
    }
    net = {"GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
    assert env == {contract.COLLECTIVE_TIMEOUT_ENV: "45", **net, **nccl}
    assert network_env(ResourcesSpec()) == {contract.COLLECTIVE_TIMEOUT_ENV: "600", **nccl}
    job = Job("r/pretrain", "file:///x/s/r", "pretrain", (), r)
    merged = job_runtime_env({"pip": ["x"], "env_vars": {"A": "1"}}, job)
    assert merged["pip"] == ["x"] and merged["env_vars"]["A"] == "1" and merged["env_vars"]["RAY_DEDUP_LOGS"] == "0"
    assert merged["env_vars"]["EXTREMA_LEASE_TTL_S"] == "10" and "EXTREMA_JOB_ID" not in merged["env_vars"]
    assert env.items() <= merged["env_vars"].items()
    with pytest.raises(ValueError, match="not a network interface name"):
        ResourcesSpec(network_interface="eth0; rm")
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")  # the submitter's own choice is left to reach the job
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" not in network_env(ResourcesSpec())


def test_slurm_task_lines_name_their_node_and_rank_even_across_requeues_and_cut_chunks() -> None:
    lines = Lines(slurm_label(1, "n2"))
    header = "submitit INFO (x) - Starting with JobEnvironment(job_id=7, hostname=n3, local_rank=0(1), node=1(2), "
    text = lines.feed("step 1\nste") + lines.feed("p 2\n" + header + "global_rank=1(2))\nstep 3")
    assert text.splitlines() == ["[n2 rank 1] step 1", "[n2 rank 1] step 2", f"[n3 rank 1] {header}global_rank=1(2))"]
    assert lines.feed("", final=True) == "[n3 rank 1] step 3"
    assert slurm_rank("/logs/12_3_1_log.err") == 1


def test_ray_worker_lines_are_named_by_the_ranks_pids() -> None:
    ranks = [{"rank": 0, "host": "n1", "pid": 100}, {"rank": 1, "host": "n2", "pid": 200}]
    label = ray_label(ranks)
    assert label("(RayTrainWorker pid=200, ip=10.77.5.12) loss 1.0\n") == "[n2 rank 1] loss 1.0\n"
    assert label("(pid=100, ip=10.77.5.11) x\n") == "[n1 rank 0] x\n"
    assert label("(RayTrainWorker pid=300, ip=10.77.5.12) y\n") == "[10.77.5.12] y\n"
    assert label("\x1b[36m(RayTrainWorker pid=100, ip=10.77.5.11)\x1b[0m z\n") == "[n1 rank 0] z\n"
    assert label("driver line\n") == "driver line\n"
    assert rank_hosts([*ranks, {"rank": "x"}, 3]) == {0: "n1", 1: "n2"}


def test_a_failed_collective_names_the_other_ranks_nodes() -> None:
    import torch.distributed as dist

    ranks = [{"rank": 0, "host": "n1", "pid": 1}, {"rank": 1, "host": "n2", "pid": 2}]
    e = dist.DistBackendError("[gloo] Timed out waiting 10000ms for recv operation to complete")
    assert entry.is_collective_failure(e)
    assert not entry.is_collective_failure(ValueError("bad batch"))
    note = entry.peer_note(e, ranks, 0)
    assert "rank 1 on n2" in note and "ranks on other nodes" in note and "Timed out waiting" in note
