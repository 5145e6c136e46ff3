"""Exactly once, and the truth, with real sweep drivers and stage processes on the local backend: two sweeps at
once, a driver killed with -9 (status, cancel, adoption), a disk that fills during submission, Ctrl-C while a
large sweep is being submitted."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extrema.run import lease
from launch.runstore import store
from launch.sweepfile.expand import load_runs
from tests.processes import interruptible
from tests.test_cli import TINY, cli


def sweep_file(tmp_path: Path, **changes: Any) -> Path:
    """tiny.yaml with its root under tmp_path and the given top-level sections replaced or merged."""
    doc = yaml.safe_load(TINY.read_text())
    doc["root"] = str(tmp_path / "runs")
    for key, value in changes.items():
        doc[key] = {**doc.get(key, {}), **value} if isinstance(value, dict) and key != "sweep" else value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def driver(path: Path, *extra: str) -> subprocess.Popen[str]:
    """`extrema-launch sweep` as its own process (its own session, as a user's terminal would start it); its
    output goes to a file (a pipe nobody reads would block a large plan), read back by `output`."""
    cmd = [sys.executable, "-m", "launch.cli", "sweep", str(path), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = open(path.parent / f"driver-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115 - closed by output()
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True, preexec_fn=interruptible
    )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen[str], timeout: float) -> str:
    """Wait for a driver and return what it printed."""
    proc.wait(timeout=timeout)
    log = proc.log  # type: ignore[attr-defined]
    log.seek(0)
    text = log.read()
    log.close()
    return text


def entry_pids(run_root: Path) -> list[int]:
    """Processes of this machine running `extrema.entry` on a stage under run_root (from the process table)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if b"extrema.entry" in cmd and any(str(run_root).encode() in c for c in cmd) and state != "Z":
            found.append(int(pid))
    return found


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@contextlib.contextmanager
def reaped(*procs: subprocess.Popen[str]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)


def statuses(root: Path) -> dict[str, dict[str, Any]]:
    return {str(p.parent.relative_to(root)): json.loads(p.read_text()) for p in root.glob("*/*/*/status.json")}


def test_two_sweeps_started_together_run_every_stage_once(tmp_path: Path) -> None:
    path = sweep_file(tmp_path)
    a, b = driver(path), driver(path)
    with reaped(a, b):
        outs = [output(p, 300) for p in (a, b)]
    assert [a.returncode, b.returncode] == [0, 0], outs
    found = statuses(tmp_path / "runs")
    assert len(found) == 4 and all(s["state"] == "completed" for s in found.values()), found
    assert all(s["attempts"] == 1 for s in found.values()), found  # one attempt trained each stage
    for stage in (tmp_path / "runs").glob("*/*/pretrain"):
        steps = [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps))  # no step logged twice
    code, out, _ = cli("status", str(path))
    assert code == 0 and out.count("completed") == 4


def slow_sweep(tmp_path: Path) -> Path:
    """One run whose pretrain takes long enough to be caught running."""
    return sweep_file(
        tmp_path,
        sweep={"grid": {"model.cls_token": ["cait"]}},
        base={**yaml.safe_load(TINY.read_text())["base"], "pretrain": {
            **yaml.safe_load(TINY.read_text())["base"]["pretrain"], "steps": 400, "ckpt_every": 20}},
    )  # fmt: skip


def orphaned_pretrain(tmp_path: Path) -> tuple[Path, Path, lease.Holder]:
    """The slow sweep's file, its pretrain stage and the attempt that owns it, running on after its driver was
    killed with -9 once the stage had logged."""
    path = slow_sweep(tmp_path)
    first = driver(path)
    with reaped(first):
        wait_for(lambda: list((tmp_path / "runs").glob("tiny/*/pretrain/metrics.jsonl")), 120, "pretrain to log")
        (stage,) = (tmp_path / "runs" / "tiny").glob("*/pretrain")
        owner = lease.live_holder(str(stage))
        assert owner is not None
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    return path, stage, owner


def test_driver_killed_then_status_cancel_and_sweep_tell_the_truth(tmp_path: Path) -> None:
    path, stage, _ = orphaned_pretrain(tmp_path)
    trainers = entry_pids(tmp_path / "runs")
    assert len(trainers) == 1  # the stage process outlives its driver (own session)
    code, out, _ = cli("status", str(path))
    assert code == 0 and "running" in out and f"pid {trainers[0]}" in out, out
    assert json.loads((stage / "status.json").read_text())["state"] == "running"

    code, out, _ = cli("cancel", str(path))
    # The queued knn died with its driver (`status` recorded it cancelled); the running pretrain is stopped.
    assert code == 0 and "cancelled 1 stage job(s)" in out and "pretrain" in out, out
    assert entry_pids(tmp_path / "runs") == []  # it really stopped
    code, out, _ = cli("status", str(path))
    assert code == 0 and "running" not in out, out
    assert {s["state"] for s in statuses(tmp_path / "runs").values()} == {"cancelled"}

    again = driver(path)
    with reaped(again):
        out = output(again, 400)
    assert again.returncode == 0, out
    status = json.loads((stage / "status.json").read_text())
    assert status["state"] == "completed" and status["attempts"] == 2  # resumed once, not restarted twice


def test_driver_killed_then_the_next_sweep_adopts_the_running_stage(tmp_path: Path) -> None:
    path, stage, owner = orphaned_pretrain(tmp_path)
    second = driver(path)
    with reaped(second):
        peak = 0
        while second.poll() is None:
            holder = lease.live_holder(str(stage))
            assert holder is None or holder.pid == owner.pid  # nobody else trains it while the orphan lives
            peak = max(peak, len(entry_pids(tmp_path / "runs")))
            time.sleep(0.2)
        out = output(second, 60)
    assert second.returncode == 0, out
    assert "adopt" in out
    assert peak <= 2  # the orphan trainer and, at most, the adopting attempt waiting for it
    found = statuses(tmp_path / "runs")
    assert {s["state"] for s in found.values()} == {"completed"}
    assert json.loads((stage / "status.json").read_text())["attempts"] == 1  # the orphan finished it alone
    assert entry_pids(tmp_path / "runs") == []


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (unmounted afterwards); skipped with the reason where mounting is not allowed, outside CI."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs in CI: {proc.stderr}")
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_disk_filling_during_submission_leaves_nothing_stuck(tmp_path: Path, tiny_disk: Path) -> None:
    path = sweep_file(tmp_path, sweep={"grid": {"pretrain.seed": list(range(400))}})
    root = str(tiny_disk / "runs")
    code, out, err = cli("sweep", str(path), "--root", root)
    assert code == 1 and "no space left on device" in out + err and "Traceback" not in out + err, out + err
    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_disk)], check=True)
    code, out, _ = cli("sweep", str(path), "--root", root, "--dry-run")
    assert code == 0 and "would submit 800 of 800 jobs" in out, out[-2000:]
    assert "already pending" not in out


def test_ctrl_c_during_a_large_submission_leaves_nothing_stuck(tmp_path: Path) -> None:
    path = sweep_file(tmp_path, sweep={"grid": {"pretrain.seed": list(range(3000))}})
    _, runs = load_runs(path)
    proc = driver(path)
    with reaped(proc):
        early = tmp_path / "runs" / "tiny" / runs[100].run_id / "pretrain" / "status.json"  # one of the first written
        wait_for(early.exists, 120, "submission")
        os.kill(proc.pid, signal.SIGINT)
        out = output(proc, 120)
    assert proc.returncode == 130, out[-2000:]
    recorded = statuses(tmp_path / "runs")
    pending = [k for k, s in recorded.items() if s.get("state") == "pending" and not s.get("job_id")]
    assert pending  # the interruption did leave records without a job id behind
    code, out, _ = cli("sweep", str(path), "--dry-run")
    assert code == 0 and "would submit 6000 of 6000 jobs" in out, out[-2000:]
    assert "already pending" not in out
    url = store.sweep_url(str(tmp_path / "runs"), "tiny")
    code, out, _ = cli("status", url) if store.read_manifest(url) else cli("status", str(path))
    assert "submission interrupted" in out or "pending" not in out
