"""Slurm backend against a real private Slurm with accounting (fixture `slurm_cluster`), running `extrema.entry`.

Planning and validation tests are pure; the `slurm` tests submit real job arrays through submitit and read real
squeue/sacct. The fixture's MaxArraySize is 2, so a sweep of three runs exercises array chunking.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from extrema.run import rundir
from extrema.run.contract import update_status
from launch.backends.base import Job, State
from launch.backends.resources import ResourcesSpec
from launch.backends.slurm.backend import SlurmBackend, StageCall, parse_states, to_state
from launch.backends.slurm.plan import afterok, parse_max_array_size, plan_arrays, planned_arrays
from launch.runstore import store
from launch.sweepfile.model import LauncherSpec
from tests.cluster_sweeps import FAST, FAST_KNN, FINAL, TINY, cli, release_requeued
from tests.clusters.slurm import SlurmCluster
from tests.stage_runs import make_run


def slurm_sweep(path: Path, grid: dict[str, list[Any]] | None, stages: list[str], **resources: Any) -> Path:
    """The tiny sweep file, on the fixture's partition, with the given stages and axes."""
    sweep = yaml.safe_load(TINY.read_text())
    sweep["base"]["stages"] = stages
    sweep["base"]["pretrain"].update(steps=2, ckpt_every=2)
    sweep["sweep"] = {"grid": grid} if grid else None
    sweep["launcher"] = {"backend": "slurm", "resources": {"partition": "debug", "time_min": 20, **resources}}
    path.write_text(yaml.safe_dump({k: v for k, v in sweep.items() if v is not None}))
    return path


def doc(url: str) -> dict[str, Any]:
    """A JSON file of the run store that must exist."""
    out = rundir.read_json(url)
    assert out is not None, f"missing {url}"
    return dict(out)


def res(**kw: Any) -> ResourcesSpec:
    """Resources of a one-CPU test job on the fixture's partition."""
    return ResourcesSpec(**{"partition": "debug", "time_min": 20, **kw})


def job(run_dir: str, stage: str, after: tuple[str, ...] = (), resources: ResourcesSpec | None = None) -> Job:
    """A stage job keyed `<run_id>/<stage>`."""
    return Job(f"{run_dir.rsplit('/', 1)[-1]}/{stage}", run_dir, stage, after, resources or res())


def wait_states(
    backend: SlurmBackend, ids: dict[str, str], done: set[State], timeout_s: float = 120
) -> dict[str, State]:
    """Poll status until every job is in `done`; the last states."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = backend.status(list(ids.values()))
        by_key = {k: states[v] for k, v in ids.items()}
        if all(s in done for s in by_key.values()) or time.monotonic() > deadline:
            return by_key
        time.sleep(1)


def step_cpus(cluster: SlurmCluster, job_id: str, timeout_s: float = 30) -> int | None:
    """CPUs Slurm allocated to step 0 of a job (the srun that runs the task), from accounting; None if unknown."""
    deadline = time.monotonic() + timeout_s
    while True:
        out = cluster.run("sacct", "-n", "-P", "-o", "JobID,AllocCPUS", "-j", job_id, check=False).stdout
        cpus = {f: c for f, _, c in (line.partition("|") for line in out.split()) if f.endswith(".0")}
        if cpus or time.monotonic() > deadline:
            return int(next(iter(cpus.values()))) if cpus else None
        time.sleep(1)


# --- pure: validation, planning, parsing -------------------------------------------------------------------------

INJECTIONS = [
    ("partition", "debug\n#SBATCH --uid=0", "resources.partition"),
    ("partition", "../../etc", "resources.partition"),
    ("account", "acct;rm -rf ~", "resources.account"),
    ("qos", "$(reboot)", "resources.qos"),
    ("constraint", "gpu`id`", "resources.constraint"),
    ("constraint", "a&b\n", "resources.constraint"),
    ("cpus_per_task", "2 --uid=0", "resources.cpus_per_task"),  # goes onto the srun line as well
    ("cpus_per_task", 0, "resources.cpus_per_task"),
]


def unchecked(**kw: Any) -> ResourcesSpec:
    """Resources built without validation, as code other than a sweep file could build them."""
    return ResourcesSpec.model_construct(**{**res().model_dump(), **kw})


@pytest.mark.parametrize(("field", "value", "named"), INJECTIONS)
def test_injection_in_a_resource_is_refused_before_submission(
    tmp_path: Path, field: str, value: Any, named: str
) -> None:
    with pytest.raises(ValueError, match=field):  # at validation, by the one rule set in extrema.spec
        res(**{field: value})
    bad = job(str(tmp_path / "sw" / "r0"), "pretrain", resources=unchecked(**{field: value}))
    with pytest.raises(ValueError, match=named):  # and again by the backend, for specs built without validation
        SlurmBackend(max_array_size=2).submit([bad], str(tmp_path / "logs"))
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"mail-user": "a@b.c\n#SBATCH --uid=0"}, "sbatch_extra"),
        ({"comment": "$(curl evil)"}, "sbatch_extra"),
        ({"chdir": "../../.."}, "sbatch_extra"),
        ({"comment": "a;b"}, "sbatch_extra"),
        ({"exclusive\n#SBATCH --x": ""}, "sbatch_extra"),
        ({"--begin": "now"}, "sbatch_extra"),
        ({"dependency": "afterany:1"}, "set by the launcher"),
        ({"array": "0-99"}, "set by the launcher"),
    ],
)
def test_injection_in_extra_sbatch_options_is_refused(tmp_path: Path, extra: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match="sbatch_extra"):
        res(sbatch_extra=extra)
    bad = job(str(tmp_path / "sw" / "r0"), "pretrain", resources=unchecked(sbatch_extra=extra))
    with pytest.raises(ValueError, match=named):
        SlurmBackend(max_array_size=2).submit([bad], str(tmp_path / "logs"))
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("sweep", ["my sweep", "sw;id", "sw$(id)", "sw\nx"])
def test_unsafe_job_names_are_refused(tmp_path: Path, sweep: str) -> None:
    with pytest.raises(ValueError, match="job name"):
        SlurmBackend(max_array_size=2).submit([job(f"{tmp_path}/{sweep}/r0", "pretrain")], str(tmp_path / "logs"))


def test_log_dir_must_be_a_shared_path() -> None:
    with pytest.raises(ValueError, match="log_dir"):
        SlurmBackend(max_array_size=2).submit([job("/x/sw/r0", "pretrain")], "s3://bucket/logs")


def test_job_ids_are_checked_before_reaching_squeue_or_scancel() -> None:
    with pytest.raises(ValueError, match="job id"):
        SlurmBackend().cancel(["--user=root"])
    with pytest.raises(ValueError, match="job id"):
        SlurmBackend().status(["1; scancel 2"])


def test_plan_uses_aftercorr_for_task_to_task_chains_and_afterok_otherwise() -> None:
    pre = [job(f"/r/sw/r{i}", "pretrain") for i in range(3)]
    knn = [job(f"/r/sw/r{i}", "knn", (f"r{i}/pretrain",)) for i in range(3)]
    ids = {"r0/pretrain": "7_0", "r1/pretrain": "7_1", "r2/pretrain": "8"}
    plans = plan_arrays(knn, ids, {"7": 2, "8": 1}, max_size=2)
    assert [([j.key for j in c], dep) for c, dep in plans] == [
        (["r0/knn", "r1/knn"], "aftercorr:7"),
        (["r2/knn"], "afterok:8"),
    ]
    # Task i waiting for task i is only ever aftercorr from index 0 on: a gap falls back to afterok.
    plans = plan_arrays([knn[0], knn[2]], {"r0/pretrain": "7_0", "r2/pretrain": "7_2"}, {"7": 3}, max_size=4)
    assert plans == [([knn[0], knn[2]], "afterok:7_0:7_2")]
    both = job("/r/sw/r9", "knn", ("r0/pretrain", "r1/pretrain"))
    assert plan_arrays([both], ids, {"7": 2}, 4) == [([both], "afterok:7")]
    assert plan_arrays(pre, {}, {}, 2) == [(pre[:2], None), (pre[2:], None)]


def test_planned_arrays_one_sbatch_per_array_chunk() -> None:
    pre = [job(f"/r/sw/r{i}", "pretrain") for i in range(3)]
    knn = [job(f"/r/sw/r{i}", "knn", (f"r{i}/pretrain",)) for i in range(3)]
    assert planned_arrays(pre + knn, max_size=2) == [
        (["r0/pretrain", "r1/pretrain"], None),
        (["r2/pretrain"], None),
        (["r0/knn", "r1/knn"], "aftercorr:1"),
        (["r2/knn"], "afterok:2"),
    ]
    thousand = [job(f"/r/sw/r{i}", "pretrain") for i in range(1000)]
    assert [len(planned_arrays(thousand, m)) for m in (1001, 1000, 300, 2)] == [1, 1, 4, 500]


def test_afterok_names_whole_arrays_only_when_all_tasks_are_awaited() -> None:
    assert afterok({"3_0", "3_1", "12"}, {"3": 2}) == "afterok:3:12"
    assert afterok({"3_1", "12"}, {"3": 2}) == "afterok:3_1:12"
    assert afterok(set(), {}) is None


def test_states_from_sacct_and_squeue_lines() -> None:
    text = "5_0|COMPLETED|None\n5_[1-3%2]|PENDING|Dependency\n5_0.batch|COMPLETED|\n6|CANCELLED by 0|None\n"
    got = parse_states(text)
    assert got["5_0"] == ("COMPLETED", "None")
    assert got["5_2"] == ("PENDING", "Dependency")
    assert got["6"] == ("CANCELLED", "None")
    assert to_state("PENDING", "DependencyNeverSatisfied") is State.CANCELLED
    assert to_state("REQUEUED") is State.PENDING
    assert to_state("PREEMPTED") is State.PREEMPTED
    assert to_state("OUT_OF_MEMORY") is State.FAILED
    assert to_state("NOT_A_STATE") is State.UNKNOWN
    assert parse_max_array_size("MaxArraySize            = 1001\nMaxJobCount = 10000\n") == 1001


GOLDEN_SBATCH = Path(__file__).resolve().parent / "golden" / "sbatch"
# Each way a task can run, as a sweep file's `launcher` says it (YAML in, sbatch scripts out: <way>.<n>.sh).
GOLDEN_WAYS = {
    "plain": "{backend: slurm, python: python3}",
    "setup": """
        backend: slurm
        python: /opt/venvs/extrema/bin/python
        setup: ["module load cuda/12.4 nccl", "source /opt/venvs/extrema/bin/activate"]
        max_parallel: 1
        max_requeues: 5
    """,
    "pyxis": """
        backend: slurm
        setup: [module load cuda]
        container: {image: "docker://nvcr.io#nvidia/pytorch:24.01", mounts: [/data, "/scratch/imagenet:/imagenet"]}
    """,
    "apptainer": """
        backend: slurm
        setup: [module load apptainer]
        container: {image: /shared/images/extrema.sif, runtime: apptainer, mounts: [/data]}
        python: /opt/conda/bin/python
    """,
}


def golden_jobs() -> list[Job]:
    """Three runs of pretrain (two nodes of four GPU ranks, every sbatch field set) and knn (one small task)."""
    big = res(
        partition="gpu",
        account="vision",
        qos="high",
        constraint="a100",
        nodes=2,
        processes_per_node=4,
        gpus_per_node=4,
        cpus_per_task=8,
        mem_gb=200,
        time_min=1440,
        sbatch_extra={"exclusive": ""},
    )
    small = res(partition="cpu", mem_gb=31.5, time_min=5)
    runs = [f"/shared/runs/ablation/r{i}" for i in range(3)]
    pre = [replace(job(r, "pretrain", resources=big), code_dir="/shared/logs/code/0123abcd") for r in runs]
    return pre + [job(r, "knn", (f"r{i}/pretrain",), resources=small) for i, r in enumerate(runs)]


def golden_scripts() -> dict[str, str]:
    """<way>.<n>.sh -> the sbatch script of the n-th array the golden jobs become, for each way's launcher."""
    jobs = golden_jobs()
    by_key = {j.key: j for j in jobs}
    arrays = [([by_key[k] for k in keys], dependency) for keys, dependency in planned_arrays(jobs, max_size=2)]
    scripts = {}
    for way, text in GOLDEN_WAYS.items():
        backend = SlurmBackend.from_launcher(LauncherSpec.model_validate(yaml.safe_load(text)))
        for i, (chunk, dependency) in enumerate(arrays, start=1):
            scripts[f"{way}.{i}.sh"] = backend.script(chunk, dependency, Path("/shared/logs"))
    plain = SlurmBackend.from_launcher(LauncherSpec.model_validate(yaml.safe_load(GOLDEN_WAYS["plain"])))
    chunk, dependency = arrays[0]  # the first array again, its stages' failures having named nodes gpu-07, gpu-12
    scripts["exclude.1.sh"] = plain.script(chunk, dependency, Path("/shared/logs"), exclude=["gpu-07", "gpu-12"])
    return scripts


def test_sbatch_scripts_are_golden_without_a_cluster() -> None:
    """The sbatch script of every array a fixed job set becomes, as submitit writes it, for each way a task runs;
    UPDATE_GOLDEN=1 rewrites tests/golden/sbatch/ on purpose."""
    scripts = golden_scripts()
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN_SBATCH.mkdir(exist_ok=True)
        for old in GOLDEN_SBATCH.glob("*.sh"):
            old.unlink()
        for name, text in scripts.items():
            (GOLDEN_SBATCH / name).write_text(text)
    assert sorted(scripts) == sorted(p.name for p in GOLDEN_SBATCH.glob("*.sh"))
    for name, text in scripts.items():
        assert text == (GOLDEN_SBATCH / name).read_text(), name
    assert "#SBATCH --dependency=aftercorr:1\n" in scripts["plain.3.sh"]
    assert "#SBATCH --mem=32256MB\n" in scripts["plain.3.sh"]
    # srun gets cpus_per_task itself: Slurm 22.05 to 23.02 srun does not inherit it from sbatch.
    for name, text in scripts.items():
        cpus = 1 if name.endswith((".3.sh", ".4.sh")) else 8
        (srun,) = [line for line in text.splitlines() if line.startswith("srun ")]
        assert f"#SBATCH --cpus-per-task={cpus}\n" in text and f" --cpus-per-task={cpus} " in srun, name
        assert srun.index("--cpus-per-task") < srun.index(" -u -m submitit"), name  # srun's option, not the command's
        assert "#SBATCH --container" not in text, name  # the batch script stays on the host, its tasks do not
    # max_parallel is each array's %n; setup lines come before the code snapshot's and run on the host.
    assert "#SBATCH --array=0-1%1\n" in scripts["setup.1.sh"] and "%2\n" in scripts["plain.1.sh"]
    assert (
        "\nmodule load cuda/12.4 nccl\nsource /opt/venvs/extrema/bin/activate\nexport PYTHONPATH="
        in scripts["setup.1.sh"]
    )
    # Containers mount the log folder (pickles, code snapshot) and the run store, and say so in the script.
    mounts = "/shared/logs:/shared/logs,/shared/runs:/shared/runs,/data:/data,/scratch/imagenet:/imagenet"
    image = "docker://nvcr.io#nvidia/pytorch:24.01"
    (pyxis,) = [line for line in scripts["pyxis.1.sh"].splitlines() if line.startswith("srun ")]
    tail = f" '--container-image={image}' --container-mounts={mounts} python -u -m submitit.core._submit /shared/logs"
    assert pyxis.endswith(f" --cpus-per-task=8{tail}"), pyxis
    apptainer = "apptainer exec --nv --bind=/shared/logs,/shared/runs,/data /shared/images/extrema.sif"
    assert f" {apptainer} /opt/conda/bin/python -u -m submitit" in scripts["apptainer.1.sh"]
    assert " apptainer exec --bind=" in scripts["apptainer.3.sh"]  # no GPU, no --nv


def test_stage_call_requeues_as_itself_carrying_only_the_run_stage_and_network_settings() -> None:
    env = {"EXTREMA_COLLECTIVE_TIMEOUT_S": "30", "GLOO_SOCKET_IFNAME": "eth0"}
    call = StageCall("file:///runs/sw/r0", "pretrain", env)
    again = call.checkpoint()
    assert isinstance(again.function, StageCall) and again.function is not call
    assert vars(again.function) == {"run_dir": "file:///runs/sw/r0", "stage": "pretrain", "env": env}
    assert again.args == () and again.kwargs == {}
    old = StageCall.__new__(StageCall)  # a call pickled before `env` existed requeues without one
    old.__dict__.update(run_dir="file:///runs/sw/r0", stage="pretrain")
    assert vars(old.checkpoint().function)["env"] == {}


# --- real Slurm ------------------------------------------------------------------------------------------------


def golden_script(folder: Path, dependency: str, name: str) -> str:
    """The sbatch script submitit writes for a two-task array of one-CPU StageCalls."""
    f = str(folder)
    return f"""#!/bin/bash

# Parameters
#SBATCH --array=0-1%2
#SBATCH --comment=extrema-test
#SBATCH --cpus-per-task=1
#SBATCH --dependency={dependency}
#SBATCH --error={f}/%A_%a_0_log.err
#SBATCH --job-name={name}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --open-mode=append
#SBATCH --output={f}/%A_%a_0_log.out
#SBATCH --partition=debug
#SBATCH --signal=USR2@90
#SBATCH --time=20
#SBATCH --wckey=submitit

# command
export SUBMITIT_EXECUTOR=slurm
srun --unbuffered --output {f}/%A_%a_%t_log.out --error {f}/%A_%a_%t_log.err --cpus-per-task=1 {shlex.quote(sys.executable)} -u -m submitit.core._submit {f}
"""  # noqa: E501


@pytest.mark.slurm
def test_array_sweep_end_to_end_with_a_failed_run(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    root, logs = tmp_path / "runs", tmp_path / "logs"
    extra = res(sbatch_extra={"comment": "extrema-test"})
    runs = [str(root / "e2e" / f"r{i}") for i in range(3)]
    for r in runs:
        make_run(r, {**FAST_KNN})
    (root / "e2e" / "r1" / "pretrain" / "spec.json").unlink()  # r1's pretrain fails (exit 2)
    jobs = [job(r, "pretrain", resources=extra) for r in runs]
    jobs += [job(r, "knn", (f"r{i}/pretrain",), resources=extra) for i, r in enumerate(runs)]
    backend = SlurmBackend()
    assert backend.max_array_size == slurm_cluster.max_array_size == 2

    ids = backend.submit(jobs, str(logs))

    pre_array, pre_single = ids["r0/pretrain"].split("_")[0], ids["r2/pretrain"]
    knn_array = ids["r0/knn"].split("_")[0]
    assert [ids[f"r{i}/pretrain"] for i in range(2)] == [f"{pre_array}_0", f"{pre_array}_1"]
    assert [ids[f"r{i}/knn"] for i in range(2)] == [f"{knn_array}_0", f"{knn_array}_1"]
    assert "_" not in pre_single and "_" not in ids["r2/knn"]
    assert len(list(logs.glob("*_submission.sh"))) == 4  # one sbatch per array chunk
    script = (logs / f"{knn_array}_submission.sh").read_text()
    assert script == golden_script(logs, f"aftercorr:{pre_array}", "e2e.knn")
    assert script == backend.script(jobs[3:5], f"aftercorr:{pre_array}", logs), "script renders what is submitted"
    assert f"--dependency=afterok:{pre_single}\n" in (logs / f"{ids['r2/knn']}_submission.sh").read_text()

    states = wait_states(backend, ids, FINAL)
    assert states == {
        "r0/pretrain": State.COMPLETED,
        "r1/pretrain": State.FAILED,
        "r2/pretrain": State.COMPLETED,
        "r0/knn": State.COMPLETED,
        "r1/knn": State.CANCELLED,  # its dependency can never be satisfied; r0's knn ran regardless
        "r2/knn": State.COMPLETED,
    }, slurm_cluster.run("sacct", "-X", "-P", "-o", "JobID,State,Reason").stdout
    for i in (0, 2):
        pre = doc(f"{runs[i]}/pretrain/status.json")
        knn = doc(f"{runs[i]}/knn/status.json")
        assert pre["state"] == knn["state"] == "completed"
        assert knn["started_at"] >= pre["finished_at"]  # afterok / aftercorr ordering
        assert (pre["job_id"], knn["job_id"]) == (ids[f"r{i}/pretrain"], ids[f"r{i}/knn"])
        assert "top1" in str(doc(f"{runs[i]}/knn/result.json"))
    assert not (root / "e2e" / "r1" / "knn" / "status.json").exists()
    assert "no spec.json" in (logs / f"{ids['r1/pretrain']}_0_log.err").read_text()
    backend.cancel([ids["r1/knn"]])


@pytest.mark.slurm
def test_preemption_requeues_and_resumes_to_the_same_result(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    # No periodic checkpoint: the one the resumed attempt starts from is saved at the signal.
    long = {"pretrain": {"steps": 6, "batch_size": 8, "ckpt_every": 1000}, "data": {"synthetic_size": 32}}
    runs = [str(root / "pre" / name) for name in ("hit", "ref")]
    for r in runs:
        make_run(r, long)
    backend = SlurmBackend()
    ids = backend.submit([job(r, "pretrain") for r in runs], str(tmp_path / "logs"))
    target = ids["hit/pretrain"]

    deadline = time.monotonic() + 90
    while not any(r.get("step", 0) >= 2 for r in rundir.read_jsonl(f"{runs[0]}/pretrain/metrics.jsonl")):
        assert time.monotonic() < deadline, "the job never got past step 2"
        time.sleep(0.2)
    assert backend.status([target]) == {target: State.RUNNING}
    slurm_cluster.run("scancel", "--signal=USR2", target)

    # Slurm holds a requeued job for about 120 s (BeginTime); release it once it is pending again.
    deadline = time.monotonic() + 60
    while not slurm_cluster.run("squeue", "-h", "-j", target, "-o", "%T", check=False).stdout.startswith("PENDING"):
        assert time.monotonic() < deadline, "the job was not requeued"
        time.sleep(0.2)
    assert backend.status([target]) == {target: State.PENDING}
    release_requeued(slurm_cluster.run, target)

    final = wait_states(backend, ids, FINAL)
    logs = "\n".join(f"== {p}\n{p.read_text()[-3000:]}" for p in sorted((tmp_path / "logs").rglob("*_log.*")))
    assert final == {"hit/pretrain": State.COMPLETED, "ref/pretrain": State.COMPLETED}, logs
    hit, ref = (doc(f"{r}/pretrain/result.json") for r in runs)
    assert hit == ref and hit["steps"] == 6
    assert doc(f"{runs[0]}/pretrain/status.json")["attempts"] == 2
    assert doc(f"{runs[1]}/pretrain/status.json")["attempts"] == 1
    history = slurm_cluster.run("sacct", "-X", "-D", "-n", "-P", "-o", "JobID,State", "-j", target).stdout
    assert history.split() == [f"{target}|REQUEUED", f"{target}|COMPLETED"]


@pytest.mark.slurm
def test_status_and_cancel_against_squeue_and_sacct(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    busy, later = str(root / "cx" / "busy"), str(root / "cx" / "later")
    make_run(busy, {"pretrain": {"steps": 500, "batch_size": 8, "ckpt_every": 1000}, "data": {"synthetic_size": 32}})
    make_run(later, FAST)
    backend = SlurmBackend()
    two_ranks = res(processes_per_node=2)  # two srun tasks joined through the environment exported from submitit
    ids = backend.submit(
        [
            job(busy, "pretrain", resources=two_ranks),
            job(later, "pretrain", resources=res(sbatch_extra={"begin": "now+3600"})),
        ],
        str(tmp_path / "logs"),
    )
    deadline = time.monotonic() + 90
    while not rundir.read_jsonl(f"{busy}/pretrain/metrics.jsonl"):  # a first step: gradients were all-reduced
        assert time.monotonic() < deadline, "the busy job never finished a training step"
        time.sleep(0.2)
    assert doc(f"{busy}/pretrain/provenance.json")["world_size"] == 2
    assert backend.status([*ids.values(), "999999"]) == {
        ids["busy/pretrain"]: State.RUNNING,
        ids["later/pretrain"]: State.PENDING,
        "999999": State.UNKNOWN,
    }

    backend.cancel(list(ids.values()))

    assert wait_states(backend, ids, FINAL, timeout_s=60) == {
        "busy/pretrain": State.CANCELLED,
        "later/pretrain": State.CANCELLED,
    }
    time.sleep(2)  # a cancelled stage that saved a checkpoint on SIGTERM must not requeue itself
    history = slurm_cluster.run("sacct", "-X", "-D", "-n", "-P", "-o", "State", "-j", ids["busy/pretrain"]).stdout
    assert [s.split()[0] for s in history.split("\n") if s] == ["CANCELLED"]
    assert backend.status([ids["busy/pretrain"]]) == {ids["busy/pretrain"]: State.CANCELLED}


@pytest.mark.slurm
def test_cli_sweep_returns_at_once_then_logs_follow_and_status_ask_slurm(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    # Two CPUs (the whole node) per task: on Slurm 22.05 to 23.02 srun inherits them only from its own argument.
    path = slurm_sweep(tmp_path / "s.yaml", None, ["pretrain", "knn"], cpus_per_task=2)
    root = str(tmp_path / "runs")
    t0 = time.monotonic()
    code, out = cli("sweep", str(path), "--root", root)
    assert code == 0 and "submitted 2 of 2 jobs to slurm" in out, out
    assert time.monotonic() - t0 < 30, "sweep returns once submitted"
    url = store.sweep_url(root, "tiny")
    (run,) = store.stored_runs(store.read_manifest(url) or {})
    knn_id = store.read_status(store.stage_url(url, run.run_id, "knn"))["job_id"]

    code, out = cli("logs", url, "--run", run.run_id, "--stage", "knn", "--follow")

    assert code == 0, out
    assert f"/{knn_id}_0_log.out <==" in out and "Starting with JobEnvironment" in out  # submitit's own log lines
    code, out = cli("status", url)
    assert code == 0 and out.count("│ completed │") == 2 and "knn_top1=" in out, out
    pretrain_id = store.read_status(store.stage_url(url, run.run_id, "pretrain"))["job_id"]
    for job_id in (pretrain_id, knn_id):  # the task's step (what srun ran) got the job's cpus_per_task
        script = Path(rundir.join(url, "logs").split("://", 1)[-1], f"{job_id.split('_')[0]}_submission.sh")
        assert "#SBATCH --cpus-per-task=2\n" in script.read_text() and " --cpus-per-task=2 " in script.read_text()
        assert step_cpus(slurm_cluster, job_id) == 2, slurm_cluster.run("sacct", "-j", job_id, "-P").stdout
    code, out = cli("sweep", str(path), "--root", root)
    assert code == 0 and "nothing to submit" in out


@pytest.mark.slurm
def test_status_records_jobs_cancelled_or_vanished_behind_the_stores_back(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    path = slurm_sweep(
        tmp_path / "s.yaml", {"pretrain.seed": [0, 1, 2]}, ["pretrain"], sbatch_extra={"begin": "now+3600"}
    )
    root = str(tmp_path / "runs")
    assert cli("sweep", str(path), "--root", root)[0] == 0
    url = store.sweep_url(root, "tiny")
    kept, vanished, scancelled = (
        store.stage_url(url, r.run_id, "pretrain") for r in store.stored_runs(store.read_manifest(url) or {})
    )
    assert "_" not in store.read_status(scancelled)["job_id"]  # MaxArraySize 2: the third run is a job of its own
    slurm_cluster.run("scancel", store.read_status(scancelled)["job_id"])
    gone = store.read_status(vanished)["job_id"]
    slurm_cluster.run("scancel", gone)
    update_status(vanished, job_id="999999")  # a job id this cluster never had

    code, out = cli("status", url)

    assert code == 0 and out.count("│ pending   │") == 1 and out.count("│ cancelled │") == 2, out
    assert store.read_status(kept)["state"] == "pending"
    s = store.read_status(scancelled)
    assert (s["state"], s["error"]) == ("cancelled", f"slurm job {s['job_id']} was cancelled")
    assert (
        store.read_status(vanished)["error"]
        == "slurm job 999999 is unknown to the cluster: it vanished or ended unrecorded"
    )
    code, out = cli("sweep", str(path), "--root", root, "--dry-run")
    assert code == 0 and out.count("submit (resume)") == 2 and "already pending" in out

    code, out = cli("cancel", url)

    assert code == 0 and "cancelled 1 stage job(s)" in out
    job_id = store.read_status(kept)["job_id"]
    # A pending array task that is cancelled leaves squeue at once and never reaches accounting.
    assert SlurmBackend().status([job_id])[job_id] in (State.CANCELLED, State.UNKNOWN)
    assert not slurm_cluster.run("squeue", "-h", "-r", "-j", job_id, check=False).stdout.strip()
    assert store.read_status(kept)["state"] == "cancelled"
