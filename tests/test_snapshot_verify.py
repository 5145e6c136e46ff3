"""A code snapshot is verified before it runs: `local_copy` refuses a hostile or damaged snapshot before it writes
anything (names outside the packages, links, extra or changed files, an id that is not its content's or not its
directory's; on file://, memory:// and S3 through the moto server), and every job verifies its copy when it starts,
so a file edited inside a stored snapshot is refused at the next attempt, with the reason in the stage's status."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pytest

from extrema.run import code_snapshot, contract, rundir
from launch.backends.base import Job, State
from launch.backends.local import LocalBackend
from launch.backends.resources import ResourcesSpec
from launch.runstore import snapshot, store
from launch.sweepfile.expand import load_runs
from tests.s3server import S3Server, isolated_aws_env, s3_server  # noqa: F401  (fixture)
from tests.test_cli import TINY, cli

REPO = Path(__file__).resolve().parent.parent
INIT = b'"""A package."""\n'


@pytest.fixture(scope="module")
def snap() -> snapshot.Snapshot:
    """The project's code, as a sweep from this checkout would snapshot it."""
    return snapshot.take(REPO)


@pytest.fixture(params=["file", "memory", "s3"])
def store_root(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A run-store root on a local path, in memory, or in a bucket of the moto S3 server."""
    if request.param == "file":
        return f"file://{tmp_path}/store"
    if request.param == "memory":
        return f"memory://snap-{uuid.uuid4().hex[:8]}"
    server: S3Server = request.getfixturevalue("s3_server")
    isolated_aws_env(monkeypatch, tmp_path)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": server.endpoint})
    bucket = f"snap-{uuid.uuid4().hex[:8]}"
    server.make_bucket(bucket)
    return f"s3://{bucket}"


def write_snapshot(root: str, files: dict[str, bytes], listed: dict[str, str], snap_id: str | None = None,
                   dirname: str | None = None) -> str:  # fmt: skip
    """A snapshot written straight into a store, as anyone who can write there could: `files` at their names,
    a manifest listing `listed` (name -> sha256) under `snap_id` (its hash by default), in `code/<dirname>`."""
    snap_id = snap_id or code_snapshot.snapshot_id(listed)
    url = rundir.join(root, "sweep", "code", dirname or snap_id)
    fs, _ = rundir.filesystem(url)
    for name, data in files.items():
        path = rundir.filesystem(rundir.join(url, code_snapshot.FILES, name))[1]
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)
    text = json.dumps({"id": snap_id, "files": listed})
    rundir.write_text_atomic(rundir.join(url, code_snapshot.FILES, code_snapshot.INSIDE), text)
    rundir.write_text_atomic(rundir.join(url, code_snapshot.MANIFEST), text)
    return url


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def written(tmp_path: Path) -> list[str]:
    """Every file under tmp_path outside the store (what a refused copy must not have written)."""
    return sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if "store" not in p.parts and p.is_file())


OUTSIDE = ["../x", "/etc/x", "extrema/../../x", "x.py", "launch/__pycache__/m.pyc", "extrema/a\\b", "extrema/./x"]


@pytest.mark.parametrize("name", OUTSIDE)
def test_a_manifest_naming_a_file_outside_the_packages_is_refused_before_anything_is_written(
    store_root: str, tmp_path: Path, name: str
) -> None:
    files = {"extrema/__init__.py": INIT}
    listed = {"extrema/__init__.py": digest(INIT), name: digest(b"payload")}
    url = write_snapshot(store_root, files, listed)
    with pytest.raises(snapshot.SnapshotError, match="is not a relative path inside extrema or launch/"):
        snapshot.local_copy(url, tmp_path / "cache")
    assert written(tmp_path) == []


def test_an_id_that_is_not_its_contents_or_its_directorys_is_refused(store_root: str, tmp_path: Path) -> None:
    listed = {"extrema/__init__.py": digest(INIT)}
    files = {"extrema/__init__.py": INIT}
    url = write_snapshot(store_root, files, listed, snap_id="0" * 20)
    with pytest.raises(snapshot.SnapshotError, match=r"its id '0{20}' does not match its files"):
        snapshot.local_copy(url, tmp_path / "cache")
    url = write_snapshot(store_root, files, listed, dirname="1" * 20)  # a valid snapshot under another's name
    with pytest.raises(snapshot.SnapshotError, match="not the one its directory is named after"):
        snapshot.local_copy(url, tmp_path / "cache")
    url = write_snapshot(store_root, {"extrema/__init__.py": b"import os\n"}, listed)  # content changed
    with pytest.raises(snapshot.SnapshotError, match=r"extrema/__init__\.py"):
        snapshot.local_copy(url, tmp_path / "cache")
    assert written(tmp_path) == []
    good = write_snapshot(store_root, files, listed)
    assert (snapshot.local_copy(good, tmp_path / "cache") / "extrema" / "__init__.py").read_bytes() == INIT


def test_links_and_extra_files_in_a_local_snapshot_are_refused(snap: snapshot.Snapshot, tmp_path: Path) -> None:
    url = snapshot.save(snap, str(tmp_path / "store" / "sweep"))
    files = snapshot.local_copy(url, tmp_path / "cache")
    assert files == tmp_path / "store" / "sweep" / "code" / snap.id / "files"
    spec = files / "extrema" / "spec.py"
    outside = tmp_path / "spec.py"
    shutil.copy(spec, outside)
    spec.unlink()
    spec.symlink_to(outside)  # the same content, through a link
    with pytest.raises(snapshot.SnapshotError, match=r"extrema/spec\.py is a link"):
        snapshot.local_copy(url, tmp_path / "cache")
    spec.unlink()
    shutil.copy(outside, spec)
    shutil.move(files / "launch", tmp_path / "launch")
    (files / "launch").symlink_to(tmp_path / "launch", target_is_directory=True)
    with pytest.raises(snapshot.SnapshotError, match="launch is a link"):
        snapshot.local_copy(url, tmp_path / "cache")
    (files / "launch").unlink()
    shutil.move(tmp_path / "launch", files / "launch")
    assert snapshot.local_copy(url, tmp_path / "cache") == files
    (files / "torch").mkdir()
    (files / "torch" / "__init__.py").write_text("raise SystemExit('not torch')\n")  # would shadow torch
    with pytest.raises(snapshot.SnapshotError, match=r"torch/__init__\.py is not one of the snapshot's files"):
        snapshot.local_copy(url, tmp_path / "cache")


def test_a_fetched_copy_is_verified_again_when_it_is_used(snap: snapshot.Snapshot, tmp_path: Path) -> None:
    url = snapshot.save(snap, f"memory://snap-{uuid.uuid4().hex[:8]}/sweep")
    files = snapshot.local_copy(url, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [snap.id]  # no staging directory left behind
    with open(files / "extrema" / "entry.py", "a") as f:
        f.write("# edited in the cache\n")
    with pytest.raises(snapshot.SnapshotError, match=r"extrema/entry\.py differs from the snapshot's manifest"):
        snapshot.local_copy(url, tmp_path / "cache")


def python(files: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """This interpreter importing the project from a snapshot directory, as a job does."""
    env = {**os.environ, "PYTHONPATH": str(files), "PYTHONSAFEPATH": "1"}
    return subprocess.run([sys.executable, *args], env=env, cwd="/", capture_output=True, text=True, timeout=120)


def test_a_process_refuses_a_snapshot_that_does_not_verify_before_running_it(
    snap: snapshot.Snapshot, tmp_path: Path
) -> None:
    assert code_snapshot.EXIT_REFUSED == contract.EXIT_USAGE
    files = snapshot.local_copy(snapshot.save(snap, str(tmp_path / "store" / "sweep")), tmp_path / "cache")
    ident = "import json; from extrema.run import code_snapshot; print(json.dumps(code_snapshot.identity()))"
    intact = python(files, "-c", ident)
    assert intact.returncode == 0 and json.loads(intact.stdout)["code_source"] == "snapshot", intact.stderr

    other = tmp_path / "other" / "files"  # the same files under a directory that is not named by their id
    shutil.copytree(files, other, symlinks=True)
    moved = python(other, "-c", ident)
    assert moved.returncode == 2 and f"holds snapshot {snap.id} but its directory is named other" in moved.stderr

    with open(files / "extrema" / "stages" / "knn.py", "a") as f:
        f.write("# edited inside the run store\n")
    for args in (["-m", "extrema.entry", str(tmp_path), "knn"], ["-c", "import launch.backends.base"]):
        refused = python(files, *args)  # a local job; Slurm's and Ray's workers unpickle through launch.backends
        assert refused.returncode == 2, refused.stderr
        (line,) = refused.stderr.splitlines()
        assert line == (
            "extrema: code snapshot refused: extrema/stages/knn.py differs from the snapshot's manifest "
            f"(changed after it was taken) (in {files})"
        )


def stage_job(run_dir: str, stage: str, files: Path) -> Job:
    return Job(f"{run_dir.rsplit('/', 1)[-1]}/{stage}", run_dir, stage, (), ResourcesSpec(), code_dir=str(files))


def run_jobs(backend: LocalBackend, jobs: list[Job], timeout: float = 120.0) -> dict[str, State]:
    ids = backend.submit(jobs, "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = backend.status(list(ids.values()))
        if all(s in (State.COMPLETED, State.FAILED, State.CANCELLED) for s in states.values()):
            return {k: states[i] for k, i in ids.items()}
        time.sleep(0.1)
    raise AssertionError(f"jobs did not end: {backend.status(list(ids.values()))}")


def test_an_edited_file_in_a_local_snapshot_is_refused_at_the_next_attempt_with_the_reason_in_status(
    snap: snapshot.Snapshot, tmp_path: Path
) -> None:
    sweep, runs = load_runs(TINY, root=str(tmp_path / "runs"))
    url = store.sweep_url(sweep.root, sweep.name)
    files = snapshot.local_copy(snapshot.save(snap, url), tmp_path / "cache")
    run_dir = store.run_url(url, runs[0].run_id)
    for stage in ("pretrain", "knn"):
        store.write_spec(rundir.join(run_dir, stage), runs[0].spec(sweep.name, stage))
        store.mark_submitted(rundir.join(run_dir, stage), "local", None)
    pretrain, knn = rundir.join(run_dir, "pretrain"), rundir.join(run_dir, "knn")
    rundir.write_json(rundir.join(pretrain, contract.RESULT), {"steps": 1})
    contract.update_status(pretrain, state=contract.StageState.COMPLETED)  # the untouched snapshot runs

    backend = LocalBackend()
    assert run_jobs(backend, [stage_job(run_dir, "pretrain", files)]) == {f"{runs[0].run_id}/pretrain": State.COMPLETED}
    log = "".join(p.read_text() for p in Path(pretrain, "logs").iterdir())
    assert "was completed by an earlier attempt; not run again" in log, log

    with open(files / "extrema" / "stages" / "knn.py", "a") as f:
        f.write("raise SystemExit('edited inside the run store')\n")
    assert run_jobs(backend, [stage_job(run_dir, "knn", files)]) == {f"{runs[0].run_id}/knn": State.FAILED}
    status = store.read_status(knn)
    assert status["state"] == "failed" and status["error"] == (
        "extrema: code snapshot refused: extrema/stages/knn.py differs from the snapshot's manifest "
        f"(changed after it was taken) (in {files}) (exit code 2)"
    ), status
    assert "edited inside the run store" not in "".join(p.read_text() for p in Path(knn, "logs").iterdir())
    shown = cli("status", str(TINY), "--root", str(tmp_path / "runs"))[1]
    assert "extrema: code snapshot refused: extrema/stages/knn.py" in shown, shown


def test_a_sweep_reusing_an_edited_stored_snapshot_is_refused_before_it_submits(tmp_path: Path) -> None:
    sweep, runs = load_runs(TINY, root=str(tmp_path / "runs"))
    url = store.sweep_url(sweep.root, sweep.name)
    stored = snapshot.save(snapshot.take(REPO), url)  # what an earlier `sweep` of this checkout stored
    with open(Path(stored) / "files" / "extrema" / "stages" / "knn.py", "a") as f:
        f.write("# edited inside the run store\n")
    code_, out, err = cli("sweep", str(TINY), "--root", str(tmp_path / "runs"), "--retry-failed")
    assert code_ == 2, out + err
    assert "code snapshot refused: extrema/stages/knn.py differs from the snapshot's manifest" in err
    assert f"remove {stored} and submit again" in " ".join(err.split())
    assert not any(Path(store.stage_url(url, r.run_id, s), "spec.json").exists() for r in runs for s in r.stages)
