"""`extrema-launch cancel` signals only what it can prove is a stage's local attempt: a lease record naming an
unrelated process, pid 1 or the CLI's own process group is reported "not stopped" and nothing is signalled.
(A real attempt being stopped: tests/test_exactly_once.py, test_driver_killed_then_status_cancel_and_sweep_...)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from extrema.run import lease
from launch.backends import local
from launch.runstore import store
from launch.sweepfile.expand import load_runs
from tests.test_cli import TINY, cli


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process of this test's own, in a process group of its own, stopped by its pid at the end."""
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def pretrain_stage(tmp_path: Path) -> tuple[str, str, str]:
    """(sweep URL, run id, stage directory) of the first run's pretrain of tiny.yaml rooted under tmp_path."""
    sweep, runs = load_runs(TINY, root=str(tmp_path / "runs"))
    url = store.sweep_url(sweep.root, sweep.name)
    return url, runs[0].run_id, store.stage_url(url, runs[0].run_id, "pretrain")


def plant_record(stage_dir: str, pid: int, pgid: int, **extra: Any) -> None:
    """A lease record of a live-looking local attempt naming `pid` and `pgid` (its start time included)."""
    record = {
        "token": "t",
        "host": socket.gethostname(),
        "pid": pid,
        "pgid": pgid,
        "pid_start": lease.process_start(pid),
        "attempt": 1,
        "job_id": f"local-{os.getpid()}-0@{socket.gethostname()}",
        "acquired_at": time.time(),
        "heartbeat_at": time.time(),
        "released": False,
        **extra,
    }
    path = Path(stage_dir) / "lease" / "00000001.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def cancel(tmp_path: Path) -> tuple[int, str]:
    """`extrema-launch cancel` of tiny.yaml under tmp_path, in this process."""
    code, out, err = cli("cancel", str(TINY), "--root", str(tmp_path / "runs"))
    return code, out + err


def test_a_record_naming_an_unrelated_process_does_not_get_it_signalled(
    tmp_path: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    _, run_id, stage = pretrain_stage(tmp_path)
    plant_record(stage, sleeper.pid, os.getpgid(sleeper.pid))
    assert lease.live_holder(stage) is not None  # the record looks like a live attempt
    code, out = cancel(tmp_path)
    assert code == 1 and f"{run_id}/pretrain: not stopped: pid {sleeper.pid} does not run extrema.entry" in out, out
    assert "sleep 60" in out
    time.sleep(0.3)
    assert sleeper.poll() is None, "the unrelated process was signalled"


def test_pid_1_and_the_cancelling_process_group_are_refused(tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    _, run_id, stage = pretrain_stage(tmp_path)
    plant_record(stage, 1, 1)
    code, out = cancel(tmp_path)
    assert code == 1 and f"{run_id}/pretrain: not stopped: the record names pid 1, process group 1" in out, out

    plant_record(stage, os.getpid(), os.getpgid(0))  # this very CLI and its group
    code, out = cancel(tmp_path)
    assert code == 1 and "this cancel's own process group or an ancestor" in out, out

    plant_record(stage, sleeper.pid, os.getpgid(0))  # a live process of ours, but the CLI's group to signal
    code, out = cancel(tmp_path)
    assert code == 1 and "this cancel's own process group or an ancestor" in out, out

    plant_record(stage, sleeper.pid, os.getpgid(sleeper.pid), pid_start="1")  # the pid reused since
    code, out = cancel(tmp_path)
    assert code == 0 and "not stopped" not in out, out  # no live attempt: nothing to signal, the stage is cancelled
    assert sleeper.poll() is None


def test_the_proof_accepts_the_commands_the_backend_starts_and_nothing_else(tmp_path: Path) -> None:
    run = str(tmp_path / "runs" / "sw" / "r0")
    me = os.getpid()
    entry = ["-m", "extrema.entry", run, "pretrain"]
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    forked = ["-m", "extrema.entry", "--processes=2", run, "pretrain"]
    for argv in (
        [sys.executable, *entry],
        [sys.executable, "-u", *entry],
        [sys.executable, *torchrun, *entry],
        [sys.executable, *forked],
    ):
        assert local.runs_stage(argv, me, run, "pretrain"), argv
        assert local.runs_stage(argv, me, f"file://{run}/", "pretrain"), "the same place, spelled as a URL"
    os.makedirs(run)
    os.symlink(tmp_path / "runs", tmp_path / "link")
    assert local.runs_stage([sys.executable, *entry], me, str(tmp_path / "link" / "sw" / "r0"), "pretrain")
    assert local.runs_stage([sys.executable, "-m", "extrema.entry", os.path.relpath(run), "pretrain"], me, run,
                            "pretrain"), "a relative run directory, from the process's working directory"  # fmt: skip
    for argv in (
        [sys.executable, *entry[:-1], "knn"],  # another stage
        [sys.executable, "-m", "extrema.entry", run + "x", "pretrain"],  # another run
        [sys.executable, "-c", "pass", *entry],  # anything else before it
        [sys.executable, "-m", "evil", "--x", *entry],
        [sys.executable, "-m", "extrema.entry", "--processes=2", "--processes=2", run, "pretrain"],
        [sys.executable, "-m", "extrema.entry", "--processes=x", run, "pretrain"],
        [sys.executable, "--processes=2", run, "pretrain"],
        ["sleep", "60"],
        [],
    ):
        assert not local.runs_stage(argv, me, run, "pretrain"), argv
