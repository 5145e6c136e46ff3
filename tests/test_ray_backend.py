"""Ray backend against a real local Ray head (fixture `ray_cluster`), running `extrema.entry` as Ray jobs."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from extrema.run import rundir
from extrema.run.contract import update_status
from launch.backends.base import Job, State
from launch.backends.ray.backend import RayBackend, driver_command, storage_path, submission_id
from launch.backends.resources import ResourcesSpec
from launch.runstore import store
from tests.cluster_sweeps import FAST_KNN, FINAL, TINY, cli
from tests.clusters import require_module
from tests.clusters.ray import INSTALL_HINT, RayCluster
from tests.stage_runs import make_run


def ray_sweep(path: Path, grid: dict[str, list[Any]] | None, stages: list[str]) -> Path:
    """The tiny sweep file on the ray backend (no address in it) with the given stages and axes."""
    sweep = yaml.safe_load(TINY.read_text())
    sweep["base"]["stages"] = stages
    sweep["base"]["pretrain"].update(steps=1, ckpt_every=1)
    sweep["sweep"] = {"grid": grid} if grid else None
    sweep["launcher"] = {"backend": "ray", "resources": {"cpus_per_task": 1}}
    path.write_text(yaml.safe_dump({k: v for k, v in sweep.items() if v is not None}))
    return path


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
        "python3", "-m", "launch.backends.ray.backend", "--address=http://head:8265", "--job-id=sid-1",
        "--after=up-1", "--after=up-2", "--cpus=3", "--gpus=1", "--workers=2", "--nodes=1",
        "--collective-timeout=600", "--max-failures=2",
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


@pytest.mark.ray
def test_cli_sweep_returns_at_once_then_logs_status_and_cancel_ask_ray(ray_cluster: RayCluster, tmp_path: Path) -> None:
    path = ray_sweep(tmp_path / "s.yaml", {"pretrain.steps": [1, 500]}, ["pretrain"])
    root = str(tmp_path / "runs")
    code, out = cli("sweep", str(path), "--root", root)  # to RAY_ADDRESS, the fixture's head
    assert code == 0 and "submitted 2 of 2 jobs to ray" in out, out
    url = store.sweep_url(root, "tiny")
    short, long = store.stored_runs(store.read_manifest(url) or {})
    long_dir = store.stage_url(url, long.run_id, "pretrain")
    assert store.read_status(long_dir)["cluster"] == ray_cluster.address

    code, out = cli("logs", url, "--run", short.run_id, "--stage", "pretrain", "--follow")

    assert code == 0 and "launch.backends.ray: running" in out, out
    deadline = time.monotonic() + 60
    while not rundir.read_jsonl(f"{long_dir}/metrics.jsonl"):
        assert time.monotonic() < deadline, "the long stage never logged a step"
        time.sleep(0.5)
    code, out = cli("status", url)
    assert code == 0 and "│ completed │" in out and "│ running   │" in out, out

    code, out = cli("cancel", url, "--run", long.run_id)

    assert code == 0 and f"cancelled 1 stage job(s): {long.run_id}/pretrain" in out
    long_id = store.read_status(long_dir)["job_id"]
    assert wait_states(RayBackend(ray_cluster.address), {"long": long_id}, timeout_s=60) == {"long": State.CANCELLED}
    update_status(long_dir, state="running", job_id="extrema-no-such-job")  # as if the job had vanished
    code, out = cli("status", url)
    assert code == 0 and "│ cancelled │" in out
    assert (
        store.read_status(long_dir)["error"]
        == "ray job extrema-no-such-job is unknown to the cluster: it vanished or ended unrecorded"
    )


@pytest.mark.ray
def test_cli_ray_without_an_address_starts_its_own_head_and_stops_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_module("ray", INSTALL_HINT)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = ray_sweep(tmp_path / "s.yaml", None, ["pretrain", "knn"])
    root = str(tmp_path / "runs")

    code, out = cli("sweep", str(path), "--root", root)

    assert code == 0, out
    assert "starting a local Ray head" in out and out.count("completed  ") == 2, out
    url = store.sweep_url(root, "tiny")
    manifest = store.read_manifest(url) or {}
    head = manifest["ray_head"]
    with pytest.raises(ProcessLookupError):
        os.kill(head["pid"], 0)  # stopped by its PID when the sweep ended
    (run,) = store.stored_runs(manifest)
    for stage in ("pretrain", "knn"):
        status = store.read_status(store.stage_url(url, run.run_id, stage))
        assert status["state"] == "completed" and status["cluster"] == head["address"]
    (kept,) = Path(store.stage_url(url, run.run_id, "knn"), "logs").glob("ray-extrema-*.log")  # kept before the stop
    code, out = cli("logs", url, "--run", run.run_id, "--stage", "knn")
    assert code == 0 and "launch.backends.ray: running" in out and out.count("\n") >= kept.read_text().count("\n")
    code, out = cli("status", url)
    assert code == 0 and out.count("│ completed │") == 2


@pytest.mark.ray
def test_the_given_address_wins_over_ray_address_in_the_environment(
    ray_cluster: RayCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's client prefers RAY_ADDRESS / RAY_API_SERVER_ADDRESS to the address it is given; a sweep's
    `launcher.ray_address` must not be redirected by them."""
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")
    backend = RayBackend(ray_cluster.address)
    assert backend.client.get_address() == ray_cluster.address
    assert backend.status(["extrema-no-such-job"]) == {"extrema-no-such-job": State.UNKNOWN}
    assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:9"  # put back
