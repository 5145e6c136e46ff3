"""`sweep --dry-run`: the resources each job shape asks, `--show-scripts` (the sbatch scripts as the Slurm backend
renders them, no cluster), `--json` (the plan alone on standard output), and idle GPUs refused."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from launch.cli import main

TINY = Path(__file__).resolve().parent.parent / "jobs" / "tiny.yaml"


def cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def dry(tmp: Path, *args: str) -> tuple[int, str, str]:
    return cli("sweep", str(TINY), "--dry-run", "--snapshot", "off", "--root", str(tmp / "runs"), *args)


def test_dry_run_shows_the_resources_of_each_job_shape(tmp_path: Path) -> None:
    code, out, _ = dry(tmp_path, "launcher.stages.knn={time_min: 9, mem_gb: 2.5, partition: cpu}")
    assert code == 0 and not (tmp_path / "runs").exists()
    assert "resources per job, as the backend would ask" in out
    rows = [
        line.split("│")[1:-1] for line in out.splitlines() if line.startswith("│ pretrain") or line.startswith("│ knn")
    ]
    cells = [[c.strip() for c in r] for r in rows if len(r) == 11]
    assert cells == [
        ["pretrain", "2", "2", "1", "1", "0", "0", "1", "-", "5 min", "-"],
        ["knn", "2", "2", "1", "1", "0", "0", "1", "2.5 GB", "9 min", "cpu"],
    ], out


def test_json_plan_is_alone_on_standard_output(tmp_path: Path) -> None:
    code, out, err = dry(tmp_path, "--json", "launcher.resources.time_min=7")
    plan = json.loads(out)
    assert code == 0 and "dry run: would submit 4 of 4 jobs to local" in err
    assert set(plan) == {"sweep", "url", "backend", "runs", "jobs", "submit", "resources"}
    assert (plan["sweep"], plan["backend"], plan["runs"], plan["submit"]) == ("tiny", "local", 2, 4)
    assert plan["url"] == str(tmp_path / "runs" / "tiny")
    job = plan["jobs"][2]
    assert set(job) == {"run", "stage", "overrides", "state", "submit", "reason", "after", "resources"}
    assert job["stage"] == "knn" and job["after"] == [f"{job['run']}/pretrain"] and job["submit"] is True
    assert job["overrides"] == {"model.cls_token": "cait"} and job["resources"]["time_min"] == 7
    (shape,) = plan["resources"]
    assert shape["stages"] == ["pretrain", "knn"] and (shape["jobs"], shape["submit"], shape["gpus"]) == (4, 4, 0)


def test_show_scripts_prints_each_sbatch_script_without_a_cluster(tmp_path: Path) -> None:
    gpu = ("launcher.resources={gpus_per_node: 2, processes_per_node: 2, partition: gpu}", "knn.batch_size=16")
    solo = "launcher.stages.knn={processes_per_node: 1, gpus_per_node: 1}"
    code, out, _ = dry(tmp_path, "--backend", "slurm", "--show-scripts", *gpu, solo)
    assert code == 0 and not (tmp_path / "runs").exists()
    scripts = out.split("# sbatch script ")[1:]
    assert len(scripts) == 2 and scripts[1].startswith("2 of 2: 2 job(s), aftercorr:1\n#!/bin/bash")
    first, second = scripts
    for line in ("#SBATCH --array=0-1%", "#SBATCH --job-name=tiny.pretrain", "#SBATCH --gpus-per-node=2"):
        assert line in first
    assert "#SBATCH --ntasks-per-node=2\n" in first and "#SBATCH --partition=gpu\n" in first
    assert "#SBATCH --dependency=aftercorr:1\n" in second and "#SBATCH --gpus-per-node=1\n" in second
    code, out, _ = dry(tmp_path, "--backend", "slurm", "--show-scripts", "--json")
    assert code == 0 and [s["jobs"][0].endswith("/pretrain") for s in json.loads(out)["scripts"]] == [True, False]


def test_plan_flags_are_refused_where_they_cannot_apply(tmp_path: Path) -> None:
    code, _, err = dry(tmp_path, "--show-scripts")
    assert code == 2 and "--show-scripts shows sbatch scripts; the backend is local (--backend slurm)" in err
    code, _, err = cli("sweep", str(TINY), "--json", "--root", str(tmp_path / "runs"))
    assert code == 2 and "add --dry-run" in err and not (tmp_path / "runs").exists()


def test_idle_gpus_are_refused_unless_allowed(tmp_path: Path) -> None:
    idle = ("launcher.resources={nodes: 2, gpus_per_node: 8, processes_per_node: 1}", "base.stages=[pretrain]")
    code, out, err = dry(tmp_path, "--backend", "slurm", *idle)
    assert code == 2 and out == ""
    assert err.splitlines()[1:] == [
        "argument launcher.resources={nodes: 2, gpus_per_node: 8, processes_per_node: 1}: launcher.resources: "
        "gpus_per_node 8 with processes_per_node 1 leaves 7 of each node's 8 GPUs idle (2 ranks on 16 GPUs): give "
        "processes_per_node: 8 (one rank per GPU), or allow_idle_gpus: true"
    ]
    code, _, _ = dry(tmp_path, "--backend", "slurm", *idle, "launcher.resources.allow_idle_gpus=true")
    assert code == 0
