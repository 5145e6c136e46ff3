"""Four real nodes (issue #30, points 3 and 6): FSDP2 pretraining across four nodes of Slurm and of Ray, each equal
bit for bit to one node with four processes; a four-node checkpoint resumed on two nodes, equal to the same resume
on one node with two processes; and a node slowed on purpose (a CPU quota on its rank) flagged as a straggler, which
with `straggler_action: fail` ends the attempt naming the node, so that the retry runs without it and ends equal to
the reference.

The clusters (`slurm_four_nodes`, `ray_four_nodes`) live for this module only. One thread per rank everywhere, so
that the reduction order is the same on every side.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extrema.run import rank_progress
from tests.cluster_sweeps import cli
from tests.clusters.cpu_limit import CpuLimit
from tests.clusters.ray_nodes import RayNodes
from tests.clusters.slurm_nodes import SlurmNodes
from tests.multinode_runs import EXPERIMENT, STEPS, TWO_NODES, only_run, slurm_sweep
from tests.multinode_runs import sweep_file as multinode_sweep_file
from tests.stage_runs import merge
from tests.test_multinode import (
    assert_equal_models,
    ckpt_steps,
    job_logs,
    status_of,
    steps_logged,
    wait_for,
    wait_state,
)

FOUR_NODES = {**TWO_NODES, "nodes": 4}
# Four ranks share the machine's two cores: a shorter run than the two-node tests' (checkpoints every 4 steps).
FOUR_STEPS = 16
FOUR_EXPERIMENT = merge(EXPERIMENT, {"pretrain": {"steps": FOUR_STEPS, "ckpt_every": 4}})


def sweep_file(path: Path, root: Path, launcher: dict[str, Any]) -> Path:
    """The one-run sweep of the four-node tests' experiment with this launcher section."""
    return multinode_sweep_file(path, root, launcher, FOUR_EXPERIMENT)


@pytest.fixture(scope="module")
def one_node_four_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: the same sweep on the local backend, one node, four processes (torchrun)."""
    tmp = tmp_path_factory.mktemp("reference4")
    launcher = {"backend": "local", "resources": {"processes_per_node": 4, "cpus_per_task": 1}}
    code, out = cli("sweep", str(sweep_file(tmp / "ref.yaml", tmp / "runs", launcher)))
    assert code == 0, out
    run = only_run(tmp / "runs")
    assert json.loads((run / "pretrain" / "provenance.json").read_text())["world_size"] == 4
    return run


@pytest.fixture
def on_four_node_slurm(slurm_four_nodes: SlurmNodes, monkeypatch: pytest.MonkeyPatch) -> SlurmNodes:
    """The CLI and its jobs talk to the four-node cluster; one thread per rank."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_four_nodes.conf))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return slurm_four_nodes


def provenance(run: Path) -> dict[str, Any]:
    """The pretrain stage's provenance record."""
    return dict(json.loads((run / "pretrain" / "provenance.json").read_text()))


def shards(run: Path, step: int) -> int:
    """How many ranks wrote the checkpoint of this step."""
    return len(list((run / "pretrain" / "ckpt" / f"step-{step}").glob("__*_0.distcp")))


@pytest.mark.slurm
def test_slurm_fsdp_across_four_nodes_equals_one_node_four_processes(
    on_four_node_slurm: SlurmNodes, one_node_four_processes: Path, tmp_path: Path
) -> None:
    path, run = slurm_sweep(tmp_path, on_four_node_slurm, FOUR_NODES, FOUR_EXPERIMENT)
    assert wait_state(path, run, {"completed", "failed"}, 300, tmp_path) == "completed", job_logs(tmp_path)
    prov = provenance(run)
    assert prov["world_size"] == 4 and prov["hosts"] == ["n1", "n2", "n3", "n4"]
    assert [(r["rank"], r["host"]) for r in prov["ranks"]] == [(0, "n1"), (1, "n2"), (2, "n3"), (3, "n4")]
    assert status_of(run)["attempts"] == 1 and shards(run, FOUR_STEPS) == 4
    assert_equal_models(run, one_node_four_processes)


@pytest.mark.slurm
def test_slurm_a_four_node_checkpoint_resumes_on_two_nodes_equal_to_one_node_two_processes(
    on_four_node_slurm: SlurmNodes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four nodes cancelled after a checkpoint; the same sweep again with `launcher.resources.nodes=2` resumes from
    the four ranks' checkpoint on two nodes; the same resume of a copy of the store on the local backend (one node,
    two processes) ends with the same bits."""
    # Ranks killed by Slurm before they record the cancel (KillWait) leave rank 0's lease to expire: a short TTL.
    monkeypatch.setenv("EXTREMA_LEASE_TTL_S", "10")
    path, run = slurm_sweep(tmp_path, on_four_node_slurm, FOUR_NODES, FOUR_EXPERIMENT)
    wait_for(lambda: any(ckpt_steps(run).values()) and steps_logged(run) >= 6, 240, "a checkpoint and step 6")
    code, out = cli("cancel", str(path))
    assert code == 0 and "cancelled 1 stage job(s)" in out, out
    print(f"\ncancel said: {out}")  # with "still holds the stage's lease" when Slurm killed the ranks first
    assert wait_state(path, run, {"cancelled", "preempted", "failed"}, 90, tmp_path) in {"cancelled", "preempted"}
    saved = max(s for s, complete in ckpt_steps(run).items() if complete)
    assert 4 <= saved < FOUR_STEPS and shards(run, saved) == 4
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "runs", copy / "runs")

    code, out = cli("sweep", str(path), "launcher.resources.nodes=2")
    assert code == 0, out
    assert wait_state(path, run, {"completed", "failed"}, 300, tmp_path) == "completed", job_logs(tmp_path)
    prov = provenance(run)
    assert prov["world_size"] == 2 and len(prov["hosts"]) == 2
    assert status_of(run)["attempts"] == 2 and shards(run, FOUR_STEPS) == 2

    local = {"backend": "local", "resources": {"processes_per_node": 2, "cpus_per_task": 1}}
    doc = yaml.safe_load(path.read_text())
    (copy / "mn.yaml").write_text(yaml.safe_dump({**doc, "root": str(copy / "runs"), "launcher": local}))
    code, out = cli("sweep", str(copy / "mn.yaml"))
    assert code == 0, out
    resumed_here = copy / "runs" / run.relative_to(tmp_path / "runs")
    assert provenance(resumed_here)["world_size"] == 2
    assert_equal_models(run, resumed_here)


# of one CPU, for the slowed rank: slow enough that the stage's last 24 steps outlast the straggler checks (a
# window's median, then 3 checks 2 s apart) on a fast machine (at 0.2 a fast one finished first, 2 runs in 5), and
# its steps stay well within the 10 s hang timeout on a slow one
SLOW_SHARE = 0.05
HANG_S = 10  # the watchdog's tick (and straggler check) every 2 s


@pytest.mark.slurm
def test_slurm_a_slow_node_is_a_straggler_and_fail_retries_without_it_equal(
    on_four_node_slurm: SlurmNodes, one_node_two_processes: Path, tmp_path: Path
) -> None:
    """A two-node stage on the four-node partition; after its first checkpoint, rank 1's process gets a twentieth of a
    CPU: rank 0 flags it a straggler naming its node and, with `straggler_action: fail`, ends the attempt; the retry
    is sent with `--exclude` of that node, runs on two others and ends equal to one node with two processes."""
    resources = {**TWO_NODES, "hang_timeout_s": HANG_S, "straggler_action": "fail", "collective_timeout_s": 60}
    path, run = slurm_sweep(tmp_path, on_four_node_slurm, resources, EXPERIMENT)
    stage = str(run / "pretrain")
    wait_for(lambda: any(ckpt_steps(run).values()) and steps_logged(run) >= 6, 240, "a checkpoint and step 6")
    slow = rank_progress.read_all(stage)[1]
    t0 = time.monotonic()
    with CpuLimit(SLOW_SHARE) as limit:
        limit.add(int(slow.pid or 0))
        wait_for(lambda: status_of(run).get("state") == "failed", 180, "the straggler to end the attempt")
    took = time.monotonic() - t0
    status = status_of(run)
    ended = f"ended after {took:.1f} s at step {steps_logged(run)} of {STEPS}"
    print(f"\nrank 1 on {slow.host} at {SLOW_SHARE:.0%} of a CPU: {ended}: {status['error'][:300]}")
    assert status["error"].startswith(f"straggler: rank 1 on {slow.host} loads data in "), status["error"]
    assert [e["node"] for e in status["bad_nodes"]] == [slow.host]
    flagged = json.loads((run / "pretrain" / "ranks" / "stragglers.json").read_text())
    assert [(r["rank"], r["host"]) for r in flagged["ranks"]] == [(1, slow.host)]
    assert wait_state(path, run, {"failed"}, 60, tmp_path) == "failed"
    _, out = cli("status", str(path))
    assert f"bad nodes, avoided on retry: {slow.host} (straggler: rank 1 loads data" in out, out

    code, out = cli("sweep", str(path), "--retry-failed")
    assert code == 0, out
    (script,) = (tmp_path / "runs").rglob(f"{status_of(run)['job_id']}_submission.sh")
    assert f"#SBATCH --exclude={slow.host}\n" in script.read_text()
    assert wait_state(path, run, {"completed", "failed"}, 300, tmp_path) == "completed", job_logs(tmp_path)
    assert slow.host not in status_of(run)["hosts"] and status_of(run)["attempts"] == 2
    assert_equal_models(run, one_node_two_processes)


@pytest.fixture
def on_four_node_ray(ray_four_nodes: RayNodes, monkeypatch: pytest.MonkeyPatch) -> Iterator[RayNodes]:
    """The CLI talks to the four-node Ray cluster; one thread per rank."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield ray_four_nodes


@pytest.mark.ray
def test_ray_fsdp_across_four_nodes_equals_one_node_four_processes(
    on_four_node_ray: RayNodes, one_node_four_processes: Path, tmp_path: Path
) -> None:
    launcher = {"backend": "ray", "ray_address": on_four_node_ray.address, "resources": FOUR_NODES}
    path = sweep_file(tmp_path / "mn.yaml", tmp_path / "runs", launcher)
    code, out = cli("sweep", str(path))
    assert code == 0, out
    run = only_run(tmp_path / "runs")
    assert wait_state(path, run, {"completed", "failed"}, 300, tmp_path) == "completed", status_of(run)
    prov = provenance(run)
    assert prov["world_size"] == 4 and sorted(prov["hosts"]) == ["n1", "n2", "n3", "n4"]
    assert_equal_models(run, one_node_four_processes)
