"""What a cluster job runs in: `launcher.container`, `python`, `setup`, `max_parallel`, `max_requeues`.

Validation refuses anything that could reach a job script outside its own word (exit 2, the dotted field); the
backends check again for settings built without validation. The Ray parts are pure (runtime environment, lanes);
one real Slurm submission proves that setup lines run before the task and the given interpreter runs it. The
golden sbatch scripts of every way a task runs are in tests/test_slurm_backend.py.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from launch.backends.base import Job
from launch.backends.container import ContainerSpec
from launch.backends.ray.backend import RayBackend, driver_command, job_runtime_env, slot_of
from launch.backends.resources import ResourcesSpec
from launch.backends.slurm.backend import SlurmBackend
from launch.runstore import store
from launch.sweepfile.model import LauncherSpec
from tests.cluster_sweeps import TINY, cli
from tests.clusters.slurm import SlurmCluster


def sweep_file(path: Path, launcher: dict[str, Any], steps: int = 2) -> Path:
    """The tiny sweep (pretrain only, one run) with this launcher."""
    sweep = yaml.safe_load(TINY.read_text())
    sweep["base"]["stages"] = ["pretrain"]
    sweep["base"]["pretrain"].update(steps=steps, ckpt_every=steps)
    sweep.pop("sweep", None)
    sweep["launcher"] = launcher
    path.write_text(yaml.safe_dump(sweep))
    return path


@pytest.mark.parametrize(
    ("launcher", "field"),
    [
        ({"container": {"image": "img$(id)"}}, "launcher.container.image"),
        ({"container": {"image": "-v /:/host img"}}, "launcher.container.image"),
        ({"container": {"image": "/images/../etc/x.sif"}}, "launcher.container.image"),
        ({"container": {"image": "x", "runtime": "docker"}}, "launcher.container.runtime"),
        ({"container": {"image": "x", "mounts": ["data"]}}, "launcher.container.mounts"),
        ({"container": {"image": "x", "mounts": ["/data,/etc:/x"]}}, "launcher.container.mounts"),
        ({"container": {"image": "x", "mounts": ["/data /x"]}}, "launcher.container.mounts"),
        ({"container": {"image": "x", "mounts": ["/a:/b:ro"]}}, "launcher.container.mounts"),
        ({"python": "python; rm -rf /"}, "launcher.python"),
        ({"python": "--version"}, "launcher.python"),
        ({"setup": ["#SBATCH --uid=0"]}, "launcher.setup"),
        ({"setup": ["module load x\nsrun evil"]}, "launcher.setup"),
        ({"max_requeues": -1}, "launcher.max_requeues"),
        ({"max_parallel": 0}, "launcher.max_parallel"),
        ({"resources": {"sbatch_extra": {"container-image": "/x.sqsh"}}}, "launcher.resources.sbatch_extra"),
    ],
)
def test_unsafe_job_settings_exit_2_naming_the_field(tmp_path: Path, launcher: dict[str, Any], field: str) -> None:
    path = sweep_file(tmp_path / "s.yaml", {"backend": "slurm", **launcher})
    code, out = cli("sweep", str(path), "--root", str(tmp_path / "runs"), "--dry-run")
    assert code == 2 and f"{field}:" in out, out
    assert not (tmp_path / "runs").exists()


def test_good_settings_are_taken_and_defaults_keep_todays_behaviour() -> None:
    spec = LauncherSpec.model_validate(
        {
            "backend": "slurm",
            "container": {"image": "docker://nvcr.io#nvidia/pytorch:24.01", "mounts": ["/data", "/scratch:/s"]},
            "setup": ["module load cuda/12.4"],
            "max_parallel": 8,
            "max_requeues": 0,
        }
    )
    backend = SlurmBackend.from_launcher(spec)
    assert (backend.array_parallelism, backend.max_num_timeout, backend.setup) == (8, 0, ("module load cuda/12.4",))
    plain = SlurmBackend.from_launcher(LauncherSpec(backend="slurm"))
    assert (plain.array_parallelism, plain.max_num_timeout, plain.container) == (256, 3, None)
    assert LauncherSpec().job_python() == sys.executable and spec.job_python() == "python"


def job(run_dir: str, code_dir: str | None = None, **resources: Any) -> Job:
    return Job(f"{run_dir.rsplit('/', 1)[-1]}/pretrain", run_dir, "pretrain", (), ResourcesSpec(**resources), code_dir)


def unchecked(**kw: Any) -> ContainerSpec:
    """A container built without validation, as code other than a sweep file could build it."""
    return ContainerSpec.model_construct(**{"runtime": "pyxis", "mounts": (), **kw})


@pytest.mark.parametrize(
    ("backend", "run_dir", "named"),
    [
        (SlurmBackend(container=unchecked(image="x;id")), "/r/s/a", "container.image"),
        (SlurmBackend(container=unchecked(image="x", mounts=("/a,b",))), "/r/s/a", "container.mounts"),
        (SlurmBackend(container=ContainerSpec(image="x", runtime="apptainer")), "/r oot/s/a", "run store"),
        (SlurmBackend(python="py thon"), "/r/s/a", "launcher.python"),
        (SlurmBackend(setup=["#SBATCH --uid=0"]), "/r/s/a", "launcher.setup"),
    ],
)  # fmt: skip
def test_the_backend_checks_again_what_it_renders(backend: SlurmBackend, run_dir: str, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        backend.script([job(run_dir)], None, Path("/shared/logs"))


def test_ray_jobs_run_in_the_image_with_the_snapshot_first_on_pythonpath() -> None:
    j = job("/shared/runs/sw/r0", code_dir="/shared/logs/code/abc")
    plain = job_runtime_env(None, j)
    assert plain["working_dir"] == "/shared/logs/code/abc" and "image_uri" not in plain
    env = job_runtime_env({"env_vars": {"A": "1"}}, j, "registry.example.org/extrema:abc")
    assert set(env) == {"image_uri", "env_vars"}  # Ray takes image_uri with env_vars and config only
    assert env["image_uri"] == "registry.example.org/extrema:abc"
    assert env["env_vars"]["PYTHONPATH"] == "/shared/logs/code/abc" and env["env_vars"]["A"] == "1"
    spec = LauncherSpec(backend="ray", container={"image": "registry.example.org/extrema:abc"}, max_parallel=2)
    ray = RayBackend.from_launcher(spec, "http://127.0.0.1:1")
    assert (ray.python, ray.image, ray.max_parallel) == ("python", "registry.example.org/extrema:abc", 2)
    assert RayBackend.from_launcher(LauncherSpec(backend="ray"), "http://x:1").python == sys.executable
    with pytest.raises(ValueError, match=r"launcher\.container\.image"):
        RayBackend(image="x $(id)")


def test_ray_max_parallel_makes_lanes_every_wait_pointing_back() -> None:
    ids = [f"j{i}" for i in range(7)]
    assert [slot_of(ids[:i], i, 3) for i in range(7)] == [None, None, None, "j0", "j1", "j2", "j3"]
    assert [slot_of(ids[:i], i, None) for i in range(7)] == [None] * 7
    argv = driver_command(job("/r/s/a"), "j4", "http://h:1", ["j0"], "python", 1, None, "j1")
    assert "--slot=j1" in argv and argv.index("--slot=j1") < argv.index("--after=j0")


@pytest.mark.slurm
def test_setup_lines_run_before_the_task_and_the_given_python_runs_it(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    marker, called = tmp_path / "setup-ran", tmp_path / "python-ran"
    wrapper = tmp_path / "bin" / "py"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\necho "$EXTREMA_SETUP_MARK $*" >> {called}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    launcher = {
        "backend": "slurm",
        "resources": {"partition": "debug", "time_min": 20},
        "python": str(wrapper),
        "setup": [f'echo "job $SLURM_JOB_ID" > {marker}', "export EXTREMA_SETUP_MARK=from-setup"],
        "max_parallel": 1,
        "max_requeues": 1,
    }
    path = sweep_file(tmp_path / "s.yaml", launcher)
    root = str(tmp_path / "runs")
    code, out = cli("sweep", str(path), "--root", root)
    assert code == 0 and "submitted 1 of 1 jobs to slurm" in out, out
    url = store.sweep_url(root, "tiny")
    (run,) = store.stored_runs(store.read_manifest(url) or {})
    code, out = cli("logs", url, "--run", run.run_id, "--stage", "pretrain", "--follow")
    assert code == 0, out
    status = store.read_status(store.stage_url(url, run.run_id, "pretrain"))
    assert status["state"] == "completed", (status, out)
    job_id = str(status["job_id"])
    assert marker.read_text() == f"job {job_id}\n"
    assert called.read_text().startswith("from-setup -u -m submitit.core._submit "), called.read_text()
    script = Path(root, "tiny", "logs", f"{job_id}_submission.sh").read_text()
    assert f"{wrapper} -u -m submitit.core._submit" in script and "#SBATCH --container" not in script
    assert os.path.exists(wrapper)
