"""Ray backend against a real local Ray head (fixture `ray_cluster`), running `extrema.entry` as Ray jobs."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from extrema import rundir
from extrema.spec import ResourcesSpec
from launch.backends.base import Job, State
from launch.backends.ray import RayBackend, driver_command, storage_path, submission_id
from tests.clusters.ray import RayCluster
from tests.stage_runs import make_run

FAST = {"pretrain": {"steps": 1, "batch_size": 8, "ckpt_every": 1}, "data": {"synthetic_size": 32}}
FAST_KNN = {**FAST, "knn": {"bank_size": 32, "val_size": 16, "k": 5, "batch_size": 32}}
FINAL = {State.COMPLETED, State.FAILED, State.CANCELLED}


def doc(url: str) -> dict[str, Any]:
    """A JSON file of the run store that must exist."""
    out = rundir.read_json(url)
    assert out is not None, f"missing {url}"
    return dict(out)


def job(run_dir: str, stage: str, after: tuple[str, ...] = (), **resources: Any) -> Job:
    """A stage job keyed `<run_id>/<stage>`."""
    return Job(f"{run_dir.rsplit('/', 1)[-1]}/{stage}", run_dir, stage, after, ResourcesSpec(**resources))


def wait_states(backend: RayBackend, ids: dict[str, str], timeout_s: float = 150) -> dict[str, State]:
    """Poll status until every job has ended; the last states by job key."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = backend.status(list(ids.values()))
        by_key = {k: states[v] for k, v in ids.items()}
        if all(s in FINAL for s in by_key.values()) or time.monotonic() > deadline:
            return by_key
        time.sleep(1)


def test_driver_command_carries_the_stage_its_resources_and_upstream_ids() -> None:
    j = job("file:///runs/sw/r0", "pretrain", cpus_per_task=3, gpus_per_node=2, processes_per_node=2)
    argv = driver_command(j, "sid-1", "http://head:8265", ["up-1", "up-2"], "python3", 2, "/logs")
    assert argv == [
        "python3", "-m", "launch.backends.ray", "--address=http://head:8265", "--job-id=sid-1",
        "--after=up-1", "--after=up-2", "--cpus=3", "--gpus=1", "--workers=2", "--max-failures=2",
        "--storage=/logs", "--", "file:///runs/sw/r0", "pretrain",
    ]  # fmt: skip
    assert submission_id("ab12/knn").startswith("extrema-ab12-knn-")
    assert submission_id("ab12/knn") != submission_id("ab12/knn")
    assert storage_path("file:///x/logs") == "/x/logs"
    assert storage_path("memory://logs") is None


@pytest.mark.ray
def test_jobs_end_to_end_in_order_and_a_failure_surfaces(ray_cluster: RayCluster, tmp_path: Path) -> None:
    ok, broken = str(tmp_path / "sw" / "ok"), str(tmp_path / "sw" / "broken")
    make_run(ok, FAST_KNN)
    make_run(broken, FAST_KNN)
    (tmp_path / "sw" / "broken" / "pretrain" / "spec.json").unlink()  # its pretrain exits 2
    jobs = [
        job(ok, "pretrain"),
        job(ok, "knn", ("ok/pretrain",)),
        job(broken, "pretrain"),
        job(broken, "knn", ("broken/pretrain",)),
    ]
    backend = RayBackend(ray_cluster.address, max_failures=0, python=sys.executable)

    ids = backend.submit(jobs, str(tmp_path / "logs"))

    assert wait_states(backend, ids) == {
        "ok/pretrain": State.COMPLETED,
        "ok/knn": State.COMPLETED,
        "broken/pretrain": State.FAILED,
        "broken/knn": State.FAILED,
    }
    pre, knn = (doc(f"{ok}/{s}/status.json") for s in ("pretrain", "knn"))
    assert knn["started_at"] >= pre["finished_at"]
    assert (pre["job_id"], knn["job_id"]) == (ids["ok/pretrain"], ids["ok/knn"])
    assert "top1" in str(doc(f"{ok}/knn/result.json"))
    assert "no spec.json" in backend.logs(ids["broken/pretrain"])
    assert f"upstream job {ids['broken/pretrain']} FAILED" in backend.logs(ids["broken/knn"])
    assert not (tmp_path / "sw" / "broken" / "knn" / "status.json").exists()


@pytest.mark.ray
def test_two_worker_stage_runs_under_torchtrainer(ray_cluster: RayCluster, tmp_path: Path) -> None:
    run = str(tmp_path / "sw" / "ddp")
    make_run(run, {"pretrain": {"steps": 2, "batch_size": 8, "ckpt_every": 2}, "data": {"synthetic_size": 32}})
    backend = RayBackend(ray_cluster.address, max_failures=0)

    ids = backend.submit([job(run, "pretrain", processes_per_node=2)], str(tmp_path / "logs"))

    assert wait_states(backend, ids) == {"ddp/pretrain": State.COMPLETED}, backend.logs(ids["ddp/pretrain"])[-3000:]
    assert doc(f"{run}/pretrain/provenance.json")["world_size"] == 2
    assert doc(f"{run}/pretrain/result.json")["steps"] == 2
    assert "RayTrainWorker" in backend.logs(ids["ddp/pretrain"])


@pytest.mark.ray
def test_cancel_stops_running_and_waiting_jobs(ray_cluster: RayCluster, tmp_path: Path) -> None:
    run = str(tmp_path / "sw" / "long")
    make_run(run, {"pretrain": {"steps": 500, "batch_size": 8, "ckpt_every": 1000}, "data": {"synthetic_size": 32}})
    backend = RayBackend(ray_cluster.address)
    ids = backend.submit([job(run, "pretrain"), job(run, "knn", ("long/pretrain",))], str(tmp_path / "logs"))
    deadline = time.monotonic() + 60
    while backend.status(list(ids.values())) != {i: State.RUNNING for i in ids.values()}:
        assert time.monotonic() < deadline, "the jobs never started"
        time.sleep(0.5)

    backend.cancel(list(ids.values()))

    assert wait_states(backend, ids, timeout_s=60) == {"long/pretrain": State.CANCELLED, "long/knn": State.CANCELLED}
    assert backend.status(["extrema-no-such-job"]) == {"extrema-no-such-job": State.UNKNOWN}
