"""Every job runs the code its sweep was submitted with: a content-addressed snapshot per submission, imported by
local, Slurm and Ray jobs (requeues and retries included); a stage refuses to resume checkpoints another snapshot
wrote unless allowed.

The real-backend tests launch from a copy of the project (a git checkout of its own, in tmp_path), so that they can
edit its source between submission and the start of a job, as a user editing or pulling a checkout does. The edit
is sabotage (the edited module raises on import): a job that imported the edited code would fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from extrema.run import code_snapshot
from launch.progress import latest_progress
from launch.runstore import snapshot
from tests.cluster_sweeps import release_requeued
from tests.clusters.ray import RayCluster
from tests.clusters.slurm import SlurmCluster
from tests.processes import interruptible

REPO = Path(__file__).resolve().parent.parent
SABOTAGE = "\nraise SystemExit('this module was edited after the sweep was submitted')\n"
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]


def project_copy(tmp_path: Path) -> Path:
    """The project's packages in a git checkout of their own under tmp_path."""
    proj = tmp_path / "proj"
    for package in snapshot.PACKAGES:
        shutil.copytree(REPO / package, proj / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (proj / ".gitignore").write_text("__pycache__/\n*.pyc\nruns/\n")
    subprocess.run(["git", "init", "-q", str(proj)], check=True)
    subprocess.run([*GIT, "-C", str(proj), "add", "-A"], check=True)
    subprocess.run([*GIT, "-C", str(proj), "commit", "-q", "-m", "copy"], check=True)
    return proj


def launcher_env(proj: Path) -> dict[str, str]:
    """The environment of a CLI that runs from the copy (its packages first, the cwd not on sys.path)."""
    return {**os.environ, "PYTHONPATH": str(proj), "PYTHONSAFEPATH": "1", "OMP_NUM_THREADS": "1"}


def cli_command(*args: str) -> list[str]:
    """`extrema-launch ARGS` as a command line of this interpreter."""
    return [sys.executable, "-c", "import sys; from launch.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def run_cli(proj: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the copy's CLI to its end."""
    return subprocess.run(cli_command(*args), cwd=proj, env=launcher_env(proj), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def sweep_file(proj: Path, launcher: dict[str, Any], stages: list[str], steps: int = 4) -> Path:
    """A one-run tiny sweep with the given stages, its root under the copy's runs/ (ignored by its git)."""
    doc = yaml.safe_load((REPO / "jobs" / "tiny.yaml").read_text())
    doc.pop("sweep")
    doc["name"] = "snap"
    doc["root"] = str(proj / "runs")
    doc["base"]["stages"] = stages
    doc["base"]["pretrain"].update(steps=steps, ckpt_every=2)
    doc["launcher"] = launcher
    path = proj / "snap.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def runs_of(proj: Path) -> list[Path]:
    """The run directories of the sweep (those holding a pretrain stage; the sweep has other directories too)."""
    root = proj / "runs" / "snap"
    return [p for p in root.iterdir() if (p / "pretrain").is_dir()] if root.is_dir() else []


def run_dir(proj: Path) -> Path:
    """The directory of the sweep's single run."""
    (found,) = runs_of(proj)
    return found


def other_run(proj: Path, run: Path) -> Path:
    """The sweep's run other than `run`."""
    (found,) = [p for p in runs_of(proj) if p != run]
    return found


def step(run: Path) -> int:
    """The last step the run's pretrain logged."""
    return int(latest_progress(str(run / "pretrain")).get("step") or 0)


def snapshot_ids(proj: Path) -> list[str]:
    """The snapshots stored for the sweep, complete ones only."""
    return sorted(p.name for p in (proj / "runs" / "snap" / "code").iterdir() if (p / code_snapshot.MANIFEST).is_file())


def record(run: Path, stage: str, name: str) -> dict[str, Any]:
    """A JSON record of a stage."""
    return dict(json.loads((run / stage / name).read_text()))


def wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll until `check` holds."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.2)


def sabotage(proj: Path, module: str) -> float:
    """Edit a module of the copy so that importing it fails, and show that it does; the time of the edit."""
    with open(proj / module, "a") as f:
        f.write(SABOTAGE)
    edited = time.time()
    name = module.removesuffix(".py").replace("/", ".")
    probe = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=proj, env=launcher_env(proj),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert probe.returncode != 0 and "edited after the sweep was submitted" in probe.stderr, probe.stderr[-2000:]
    return edited


def assert_ran_snapshot(run: Path, stage: str, snapshot_id: str, from_store: bool = True) -> None:
    """The stage completed and its provenance says it imported the intact snapshot (from the run store's copy, or
    from the copy Ray made of it)."""
    assert record(run, stage, "status.json")["state"] == "completed", record(run, stage, "status.json")
    prov = record(run, stage, "provenance.json")
    assert (prov["code"], prov["code_source"]) == (snapshot_id, "snapshot"), prov
    if from_store:
        assert Path(prov["code_path"]).parts[-3:] == ("code", snapshot_id, "files")
    assert record(run, stage, "status.json")["code"] == snapshot_id


# --- the snapshot itself -----------------------------------------------------------------------------------------


def test_a_snapshot_is_the_working_tree_content_addressed(tmp_path: Path) -> None:
    proj = project_copy(tmp_path)
    first = snapshot.take(proj)
    assert first.changed == () and first.git_sha and len(first.id) == 20
    assert set(first.files) == set(snapshot.installed_files(proj))  # everything git has, nothing else
    assert snapshot.take(proj).id == first.id
    (proj / "extrema" / "note.py").write_text("X = 1\n")  # untracked, not ignored: taken
    (proj / "extrema" / "cache.pyc").write_bytes(b"\0")  # ignored: left out
    with open(proj / "launch" / "cli" / "app.py", "a") as f:
        f.write("# edited\n")
    second = snapshot.take(proj)
    assert second.id != first.id and "extrema/note.py" in second.files and "extrema/cache.pyc" not in second.files
    assert second.changed == ("extrema/note.py", "launch/cli/app.py")
    shutil.rmtree(proj / ".git")  # outside a checkout: the installed files, no git
    outside = snapshot.take(proj)
    assert outside.git_sha is None and "extrema/note.py" in outside.files


def test_snapshots_on_an_object_store_are_fetched_verified_and_refused_when_tampered(tmp_path: Path) -> None:
    snap = snapshot.take(REPO)
    url = snapshot.save(snap, "memory://snaptest/sweep")
    assert snapshot.save(snap, "memory://snaptest/sweep") == url  # stored once
    files = snapshot.local_copy(url, tmp_path / "cache")
    assert files == tmp_path / "cache" / snap.id / "files"
    assert (files / "extrema" / "entry.py").read_bytes() == (REPO / "extrema" / "entry.py").read_bytes()
    import fsspec

    with fsspec.open(f"{url}/files/extrema/entry.py", "wb") as f:
        f.write(b"tampered")
    with pytest.raises(snapshot.SnapshotError, match=r"extrema/entry\.py differs from"):
        snapshot.local_copy(url, tmp_path / "other-cache")


def test_a_process_importing_a_snapshot_knows_it_and_refuses_edits_to_it(tmp_path: Path) -> None:
    snap = snapshot.take(REPO)
    files = snapshot.local_copy(snapshot.save(snap, str(tmp_path / "sweep")), tmp_path / "cache")
    probe = "import json; from extrema.run import code_snapshot; print(json.dumps(code_snapshot.identity()))"
    env = {**os.environ, "PYTHONPATH": str(files), "PYTHONSAFEPATH": "1"}

    def identity() -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True)

    intact = json.loads(identity().stdout)
    assert intact["code"] == snap.id and intact["code_source"] == "snapshot"
    with open(files / "extrema" / "spec.py", "a") as f:
        f.write("# edited in place\n")
    edited = identity()  # refused as `extrema.run.code_snapshot` is imported, before the edited module runs
    assert edited.returncode == 2 and edited.stdout == "", edited.stdout
    assert "code snapshot refused: extrema/spec.py differs from the snapshot's manifest" in edited.stderr
    assert code_snapshot.identity()["code_source"] == "installed"  # this test process runs the checkout


def test_resuming_across_a_code_change_is_refused_unless_allowed() -> None:
    a = {"code": "a" * 20, "code_source": "snapshot"}
    b = {"code": "b" * 20, "code_source": "snapshot"}
    assert code_snapshot.changes_on_resume(None, b, True, False, 1.0) == []  # first attempt
    assert code_snapshot.changes_on_resume(a, a, True, False, 1.0) == []
    assert code_snapshot.changes_on_resume(a, b, False, False, 1.0) == []  # nothing to resume
    assert code_snapshot.changes_on_resume({"code": None}, b, True, False, 1.0) == []  # recorded before code was
    with pytest.raises(code_snapshot.CodeChanged, match=f"written by snapshot {'a' * 20}, this attempt runs snapshot"):
        code_snapshot.changes_on_resume(a, b, True, False, 1.0)
    installed = {"code": None, "code_source": "installed"}
    with pytest.raises(code_snapshot.CodeChanged, match="written by the installed code"):
        code_snapshot.changes_on_resume(installed, b, True, False, 1.0)
    allowed = code_snapshot.changes_on_resume(a, b, True, True, 5.0)
    assert allowed == [{"from": "a" * 20, "to": "b" * 20, "allowed_at": 5.0}]
    assert code_snapshot.changes_on_resume({**b, "code_changes": allowed}, b, True, False, 6.0) == allowed


# --- real backends -----------------------------------------------------------------------------------------------


def test_local_jobs_run_the_submitted_code_and_a_resume_across_a_change_is_refused(tmp_path: Path) -> None:
    proj = project_copy(tmp_path)
    path = sweep_file(proj, {"backend": "local", "resources": {"cpus_per_task": 1}}, ["pretrain", "knn"], steps=30)
    driver = subprocess.Popen(cli_command("sweep", str(path)), cwd=proj, env=launcher_env(proj), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=interruptible)  # fmt: skip
    try:
        wait_for(lambda: len(runs_of(proj)) == 1 and step(run_dir(proj)) >= 3, 120, "step 3")
        edited = sabotage(proj, "extrema/stages/knn.py")  # knn starts after this edit
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 0, out[-3000:]
    (first,) = snapshot_ids(proj)
    run = run_dir(proj)
    assert_ran_snapshot(run, "pretrain", first)
    assert_ran_snapshot(run, "knn", first)
    assert record(run, "knn", "status.json")["started_at"] > edited  # it imported its code after the edit

    # An unfinished pretrain with checkpoints from `first`, then a benign edit: the next submission is new code.
    subprocess.run([*GIT, "-C", str(proj), "checkout", "-q", "--", "extrema/stages/knn.py"], check=True)
    path = sweep_file(proj, {"backend": "local", "resources": {"cpus_per_task": 1}}, ["pretrain"], steps=60)
    driver = subprocess.Popen(cli_command("sweep", str(path)), cwd=proj, env=launcher_env(proj), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=interruptible)  # fmt: skip
    try:
        wait_for(lambda: len(runs_of(proj)) == 2 and step(other_run(proj, run)) >= 3, 120, "step 3 of the long run")
        driver.send_signal(signal.SIGINT)  # Ctrl-C: stopped, resumable
        out, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, out[-3000:]
    long_run = other_run(proj, run)
    assert any((long_run / "pretrain" / "ckpt").iterdir())
    with open(proj / "extrema" / "stages" / "pretrain.py", "a") as f:
        f.write("# a comment: other code all the same\n")
    refused = run_cli(proj, "sweep", str(path))
    assert refused.returncode == 1, refused.stdout[-3000:] + refused.stderr[-3000:]
    status = record(long_run, "pretrain", "status.json")
    assert "CodeChanged" in status["error"] and "--allow-code-change" in status["error"], status
    second = next(i for i in snapshot_ids(proj) if i != first and i == status.get("submitted_code"))
    before = record(long_run, "pretrain", "provenance.json")["code"]
    assert before != second
    allowed = run_cli(proj, "sweep", str(path), "--retry-failed", "--allow-code-change", timeout=600)
    assert allowed.returncode == 0, allowed.stdout[-3000:] + allowed.stderr[-3000:]
    prov = record(long_run, "pretrain", "provenance.json")
    assert prov["code"] == second and [(c["from"], c["to"]) for c in prov["code_changes"]] == [(before, second)]
    shown = run_cli(proj, "results", str(path), "--code", second[:8], "--format", "json")
    assert shown.returncode == 0 and [r["code"] for r in json.loads(shown.stdout)] == [second], shown.stdout


@pytest.mark.slurm
def test_a_held_then_requeued_slurm_job_runs_the_submitted_code(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    proj = project_copy(tmp_path)
    launcher = {"backend": "slurm", "resources": {"partition": "debug", "time_min": 20, "sbatch_extra": {"hold": ""}}}
    path = sweep_file(proj, launcher, ["pretrain"], steps=30)
    sent = run_cli(proj, "sweep", str(path))
    assert sent.returncode == 0, sent.stdout[-3000:] + sent.stderr[-3000:]
    (snap,) = snapshot_ids(proj)
    run = run_dir(proj)
    job_id = str(record(run, "pretrain", "status.json")["job_id"])
    assert slurm_cluster.run("squeue", "-h", "-j", job_id, "-o", "%T|%r").stdout.strip() == "PENDING|JobHeldUser"
    sabotage(proj, "extrema/stages/pretrain.py")  # edited while the job waits in the queue
    slurm_cluster.run("scontrol", "release", job_id)
    wait_for(lambda: step(run) >= 2, 120, "step 2")
    slurm_cluster.run("scancel", "--signal=USR2", job_id)  # preempted: requeued, and starts again after the edit
    wait_for(lambda: slurm_cluster.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False).stdout.startswith(
        "PENDING"), 90, "the requeue")  # fmt: skip
    release_requeued(slurm_cluster.run, job_id)
    wait_for(lambda: record(run, "pretrain", "status.json").get("state") in ("completed", "failed"), 180, "the end")
    assert record(run, "pretrain", "status.json")["attempts"] == 2
    assert_ran_snapshot(run, "pretrain", snap)


@pytest.mark.slurm
def test_a_slurm_job_refusing_an_edited_stored_snapshot_says_why_in_status(
    slurm_cluster: SlurmCluster, tmp_path: Path
) -> None:
    proj = project_copy(tmp_path)
    launcher = {"backend": "slurm", "resources": {"partition": "debug", "time_min": 20, "sbatch_extra": {"hold": ""}}}
    path = sweep_file(proj, launcher, ["pretrain"])
    sent = run_cli(proj, "sweep", str(path))
    assert sent.returncode == 0, sent.stdout[-3000:] + sent.stderr[-3000:]
    (snap,) = snapshot_ids(proj)
    run = run_dir(proj)
    job_id = str(record(run, "pretrain", "status.json")["job_id"])
    stored = proj / "runs" / "snap" / "code" / snap / "files" / "extrema" / "stages" / "pretrain.py"
    stored.chmod(0o644)
    with open(stored, "a") as f:  # edited inside the run store while the job waits in the queue
        f.write(SABOTAGE)
    slurm_cluster.run("scontrol", "release", job_id)

    def ended() -> bool:
        out = slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State", check=False).stdout
        return out.strip().startswith(("FAILED", "COMPLETED"))

    wait_for(ended, 120, "the job to end")
    shown = run_cli(proj, "status", str(path), "--json")
    assert shown.returncode in (0, 1), shown.stdout[-3000:] + shown.stderr[-3000:]
    (row,) = json.loads(shown.stdout)
    reason = "extrema: code snapshot refused: extrema/stages/pretrain.py differs from the snapshot's manifest"
    assert row["state"] == "failed" and row["error"].startswith(f"slurm job {job_id} failed: {reason}"), row
    assert record(run, "pretrain", "status.json")["error"] == row["error"]  # recorded, for every later reader
    assert "edited after the sweep was submitted" not in row["error"]  # the edited module never ran


@pytest.mark.ray
def test_ray_jobs_run_the_submitted_code(ray_cluster: RayCluster, tmp_path: Path) -> None:
    proj = project_copy(tmp_path)
    path = sweep_file(proj, {"backend": "ray", "ray_address": ray_cluster.address}, ["pretrain", "knn"])
    sent = run_cli(proj, "sweep", str(path))
    assert sent.returncode == 0, sent.stdout[-3000:] + sent.stderr[-3000:]
    edited = sabotage(proj, "extrema/stages/knn.py")
    (snap,) = snapshot_ids(proj)
    run = run_dir(proj)
    wait_for(lambda: (run / "knn" / "status.json").is_file() and record(run, "knn", "status.json").get("state") in (
        "completed", "failed"), 240, "knn to end")  # fmt: skip
    assert_ran_snapshot(run, "pretrain", snap, from_store=False)
    assert_ran_snapshot(run, "knn", snap, from_store=False)
    assert record(run, "knn", "status.json")["started_at"] > edited
    assert "working_dir_files" in record(run, "knn", "provenance.json")["code_path"]
