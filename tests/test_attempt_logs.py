"""Every attempt of a local stage keeps its own log, on a local path and on S3 (the moto server), and
`extrema-launch logs` shows them all, in the order the attempts started, each under a header line; an older
store's single `local.log` is shown before them."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import fsspec
import pytest

from extrema.run import rundir
from launch import logs
from launch.backends.base import State
from launch.backends.local import LocalBackend
from launch.backends.log_source import file_source
from launch.runstore import store
from tests.s3server import S3Server, isolated_aws_env, s3_server  # noqa: F401  (fixture)
from tests.test_cli import cli
from tests.test_local_backend import ScriptJob, job, wait_all


@pytest.fixture(params=["file", "s3"])
def sweep(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A sweep URL (with a manifest listing run `a`, stage pretrain) on a local path or in a moto S3 bucket."""
    if request.param == "file":
        url = f"file://{tmp_path}/runs/sw"
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        isolated_aws_env(monkeypatch, tmp_path)
        monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": server.endpoint})
        bucket = f"logs-{uuid.uuid4().hex[:8]}"
        server.make_bucket(bucket)
        url = f"s3://{bucket}/runs/sw"
    store.write_manifest(url, {"sweep": "sw", "runs": [{"run_id": "a", "stages": ["pretrain"], "overrides": {}}]})
    return url


def attempt(tmp_path: Path, url: str, code: int) -> State:
    """One attempt at stage a/pretrain of the sweep: a script job that prints, then exits with `code`."""
    base = job(tmp_path, "a/pretrain", code=code)
    one = ScriptJob(base.key, rundir.join(url, "a"), "pretrain", (), base.resources, events=base.events, code=code)
    backend = LocalBackend()
    return wait_all(backend, backend.submit([one], ""))["a/pretrain"]


def test_two_attempts_keep_two_logs_shown_in_order(sweep: str, tmp_path: Path) -> None:
    assert attempt(tmp_path, sweep, code=1) == State.FAILED  # the attempt that failed, then the one that did not
    assert attempt(tmp_path, sweep, code=0) == State.COMPLETED
    stage = store.stage_url(sweep, "a", "pretrain")
    found = logs.in_attempt_order(store.log_files(stage))
    assert [u.rsplit("/", 1)[-1] for u in found] == ["local.1.log", "local.2.log"]
    texts = [rundir.filesystem(u)[0].cat_file(rundir.filesystem(u)[1]).decode() for u in found]
    assert all(t.startswith("=== ") and "hello from a/pretrain" in t and t.count("=== ") == 1 for t in texts)

    code, out, _ = cli("logs", sweep, "--run", "a", "--stage", "pretrain")
    assert code == 0, out
    headers = [line for line in out.splitlines() if line.startswith("==> ")]
    assert headers == [f"==> attempt 1: {found[0]} <==", f"==> attempt 2: {found[1]} <=="], out
    first, second = out.split(headers[1])
    assert first.count("hello from a/pretrain") == 1 and second.count("hello from a/pretrain") == 1


def test_a_running_attempts_log_is_in_the_store_before_it_ends(sweep: str, tmp_path: Path) -> None:
    """On S3 the log goes up while the job runs, so a driver killed mid-job leaves what the job printed."""
    base = job(tmp_path, "a/pretrain", seconds=60)
    one = ScriptJob(base.key, rundir.join(sweep, "a"), "pretrain", (), base.resources, events=base.events, seconds=60)
    backend = LocalBackend(log_upload_s=0.2)
    ids = backend.submit([one], "")
    stage = store.stage_url(sweep, "a", "pretrain")
    deadline = time.monotonic() + 30
    text = ""
    try:
        while "hello from a/pretrain" not in text:
            assert time.monotonic() < deadline, f"the running job's log never reached the store: {text!r}"
            assert backend.status(list(ids.values())) == {ids["a/pretrain"]: State.RUNNING}
            (url,) = store.log_files(stage)
            text = rundir.filesystem(url)[0].cat_file(rundir.filesystem(url)[1]).decode()
            time.sleep(0.1)
        assert text.startswith("=== ") and text.count("=== ") == 1
    finally:
        backend.cancel(list(ids.values()))
    assert wait_all(backend, ids)["a/pretrain"] == State.CANCELLED


def test_an_older_stores_single_log_is_shown_first(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/runs/sw"
    store.write_manifest(url, {"sweep": "sw", "runs": [{"run_id": "a", "stages": ["pretrain"], "overrides": {}}]})
    stage = store.stage_url(url, "a", "pretrain")
    rundir.write_text_atomic(rundir.join(stage, "logs", "local.log"), "from the older launcher\n")
    code, out, _ = cli("logs", url, "--run", "a", "--stage", "pretrain")
    assert code == 0 and out == "from the older launcher\n", out  # a lone log goes bare, as before
    assert attempt(tmp_path, url, code=0) == State.COMPLETED
    for name in ("local.10.log", "ray-raysubmit_1.log"):
        rundir.write_text_atomic(rundir.join(stage, "logs", name), f"{name}\n")
    code, out, _ = cli("logs", url, "--run", "a", "--stage", "pretrain")
    headers = [line.split(f"{stage}/logs/")[-1] for line in out.splitlines() if line.startswith("==> ")]
    assert headers == ["local.log <==", "local.1.log <==", "local.10.log <==", "ray-raysubmit_1.log <=="], out
    assert "==> earlier attempts, one file: " in out and out.index("older launcher") < out.index("hello from")


def test_the_reason_a_log_ends_with_skips_warnings(tmp_path: Path) -> None:
    path = tmp_path / "job.err"
    path.write_text(
        "extrema: code snapshot refused: extrema/spec.py differs (in /x)\n"
        "0: extrema: warning: precision bf16 on this CPU (AVX2, no AVX-512) makes every matrix product slower\n"
        "Traceback: nothing the project said\n"
    )
    assert logs.last_said([file_source(str(path))]) == "extrema: code snapshot refused: extrema/spec.py differs (in /x)"
    path.write_text("extrema: warning: only a warning\n")
    assert logs.last_said([file_source(str(path))]) is None
