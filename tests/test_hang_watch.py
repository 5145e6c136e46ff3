"""Hung ranks, found and named (issue #30): progress records out of band, a SIGSTOPped rank under torchrun on gloo
ends every live rank within the hang timeout with stacks dumped and the stopped rank named, and the retry resumes
to the same bits."""

from __future__ import annotations

import contextlib
import faulthandler
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from extrema.run import contract, rank_progress, rundir
from extrema.run.rank_progress import RankRecord
from extrema.train.watchdog import Watchdog
from launch.backends.base import network_env
from launch.backends.ray.head import free_ports
from launch.backends.resources import ResourcesSpec
from tests.stage_runs import checkpointed_model, make_run

HANG_S = 10.0
# Enough steps that a run cannot end between a record showing step 4 and the test stopping a rank: records are
# written every 2 s (a fifth of HANG_S), and a tiny step takes tens of milliseconds.
STEPS = 80
SETUP = {"model": {"drop_path_rate": 0.0}, "pretrain": {"steps": STEPS, "ckpt_every": 10, "keep_last": 20}}


def torchrun_cmd(run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(free_ports(1)[0]), "--master_addr", "127.0.0.1"]
    return [*cmd, "-m", "extrema.entry", str(run_dir), "pretrain"]


def env(hang_s: float) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", rank_progress.HANG_TIMEOUT_ENV: f"{hang_s:g}"}


def run(run_dir: Path, hang_s: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_cmd(run_dir), capture_output=True, text=True, timeout=240, env=env(hang_s))
    assert proc.returncode == 0, "\n".join(line for line in proc.stderr.splitlines() if "extrema" in line)[-3000:]
    return proc


def assert_bitwise(a: Path, b: Path) -> None:
    x, y = checkpointed_model(a / "pretrain"), checkpointed_model(b / "pretrain")
    assert x.keys() == y.keys()
    assert [k for k in x if not torch.equal(x[k], y[k])] == []


def records(run_dir: Path) -> dict[int, RankRecord]:
    return rank_progress.read_all(str(run_dir / "pretrain"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two ranks, hang detection off (records still written)."""
    path = tmp_path_factory.mktemp("reference")
    make_run(str(path), SETUP)
    run(path, 0)
    return path


def test_a_healthy_run_keeps_records_and_is_unaffected(reference: Path, tmp_path: Path) -> None:
    make_run(str(tmp_path), SETUP)
    run(tmp_path, HANG_S)
    recs = records(tmp_path)
    assert sorted(recs) == [0, 1]
    for r, rec in recs.items():
        assert rec.host == socket.gethostname() and rec.step == STEPS and rec.phase == rank_progress.ENDED
        assert rec.step_s is not None and rec.step_s > 0 and rec.data_s is not None
    assert not (tmp_path / "pretrain" / "hang").exists()
    assert json.loads((tmp_path / "pretrain" / "status.json").read_text())["state"] == "completed"
    assert_bitwise(tmp_path, reference)
    assert sorted(records(reference)) == [0, 1]


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("stopped", [1, 0])
def test_a_stopped_rank_ends_every_live_rank_names_it_and_the_retry_resumes_equal(
    reference: Path, tmp_path: Path, stopped: int
) -> None:
    make_run(str(tmp_path), SETUP)
    proc = subprocess.Popen(
        torchrun_cmd(tmp_path), env=env(HANG_S), start_new_session=True, stderr=subprocess.PIPE, text=True
    )
    pids: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 180
        while not ((recs := records(tmp_path)).keys() == {0, 1} and min(r.step for r in recs.values()) >= 4):
            assert time.monotonic() < deadline and proc.poll() is None, "no progress"
            time.sleep(0.1)
        pids = {r: rec.pid for r, rec in recs.items()}
        live = 1 - stopped
        os.kill(pids[stopped], signal.SIGSTOP)
        t0 = time.monotonic()
        while alive(pids[live]):
            assert time.monotonic() - t0 < HANG_S + 15, "the live rank did not end"
            time.sleep(0.1)
        took = time.monotonic() - t0
        status = json.loads((tmp_path / "pretrain" / "status.json").read_text())
        error = status["error"]
        print(f"\nstopped rank {stopped}: live rank ended after {took:.1f} s; status: {error}")
        assert status["state"] == "failed"
        assert error.startswith("hung at step ")
        assert f"rank {stopped} on {socket.gethostname()} (pid {pids[stopped]})" in error
        assert "stack is unavailable" in error and "/hang/" in error
        dump = (tmp_path / "pretrain" / "hang" / f"{live}.txt").read_text()
        assert "main thread 0x" in dump and "most recent call first" in dump
        assert not (tmp_path / "pretrain" / "hang" / f"{stopped}.txt").exists()
    finally:
        for pid in [*pids.values(), -proc.pid]:  # the stopped rank may have left torchrun's group: by pid too
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait()
    run(tmp_path, HANG_S)  # the retry resumes from the last checkpoint
    assert json.loads((tmp_path / "pretrain" / "status.json").read_text())["state"] == "completed"
    assert_bitwise(tmp_path, reference)


def test_the_innermost_frame_of_the_main_thread_is_read_from_a_dump() -> None:
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        with tempfile.TemporaryFile("w+") as f:
            f.write(f"{rank_progress.MAIN_HEADER}0x{threading.main_thread().ident or 0:016x}\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            text = f.read()
    finally:
        release.set()
        worker.join()
    frame = rank_progress.innermost_frame(text)
    assert frame is not None and frame.endswith("test_the_innermost_frame_of_the_main_thread_is_read_from_a_dump")


def rec(rank: int, step: int, phase: str, written_at: float, progress_at: float = 0.0) -> RankRecord:
    return RankRecord(rank, f"h{rank}", 100 + rank, "a", step, progress_at, phase, progress_at, written_at)


def test_the_rank_behind_is_the_silent_one_else_the_one_not_waiting_in_a_collective() -> None:
    now = 1000.0
    fresh = {0: rec(0, 7, rank_progress.SYNC, now), 1: rec(1, 7, rank_progress.LOADING, now), 2: rec(2, 8, "x", now)}
    assert rank_progress.behind(fresh, 3, now, 5)[0] == 1
    silent = {**fresh, 2: rec(2, 8, rank_progress.SYNC, now - 60)}
    why = "its record stopped 60 s ago: the process is stopped or frozen"
    assert rank_progress.behind(silent, 3, now, 5) == (2, why)
    assert rank_progress.behind({0: fresh[0]}, 2, now, 5) == (1, "no progress record")


def loading(rank: int, data_s: float, step_s: float, now: float) -> RankRecord:
    """A rank's record in the middle of training, with its median loading and step times."""
    phase = rank_progress.COMPUTE
    return RankRecord(rank, f"n{rank + 1}", 100 + rank, "n1:100", 9, now, phase, now, now, step_s, data_s)


@pytest.mark.parametrize("action", ["flag", "fail"])
def test_a_rank_slow_at_loading_in_consecutive_checks_is_flagged_and_fail_ends_the_stage(
    action: str, tmp_path: Path
) -> None:
    """Rank 0's check over the ranks' records: rank 1 loads data 6x slower than rank 0 (a share of its step that
    counts); flagged on the third consecutive check (`stragglers.json`, `status`), not before; with `fail`, the stage
    is recorded failed naming rank 1's node bad, every rank is told to end (`hang/declared.json`), and rank 0 ends
    with the failure exit code. A rank merely slower by 1.2x is never flagged."""
    stage = str(tmp_path / "pretrain")
    ranks = [{"host": "n1", "pid": 100}, {"host": "n2", "pid": 101}]
    ended: list[int] = []
    dog = Watchdog(stage, 0, ranks, 10.0, interval_s=60, end=ended.append, straggler_action=action)
    now = time.time()
    close = {0: loading(0, 0.10, 1.0, now), 1: loading(1, 0.12, 1.0, now)}
    for _ in range(5):
        dog.check_stragglers(close)
    assert not rundir.exists(rank_progress.stragglers_url(stage))
    slow = {0: loading(0, 0.05, 1.0, now), 1: loading(1, 0.30, 1.0, now)}
    for _ in range(rank_progress.STRAGGLER_CHECKS - 1):
        dog.check_stragglers(slow)
    assert not rundir.exists(rank_progress.stragglers_url(stage))
    for r in (0, 1):
        rank_progress.write(stage, slow[r])
    if action == "flag":
        dog.check_stragglers(slow)
        assert ended == []
        assert contract.read_record(rank_progress.stragglers_url(stage))["ranks"][0]["host"] == "n2"
        assert "stragglers: rank 1 on n2" in str(rank_progress.summary(stage, now))
        return
    # The other rank's dump arrives while rank 0 waits for it, as a live rank's would at its next tick.
    rundir.write_text_atomic(rank_progress.dump_url(stage, 1), "rank 1's stacks")
    with pytest.raises(SystemExit):
        dog.check_stragglers(slow)
    assert ended == [contract.EXIT_FAILED]
    status = dict(contract.read_record(rundir.join(stage, "status.json")) or {})
    assert status["state"] == "failed"
    assert status["error"].startswith("straggler: rank 1 on n2 loads data in 0.300 s a step (6.0x"), status["error"]
    assert "ended (straggler_action: fail), its node avoided on retry" in status["error"]
    assert [e["node"] for e in status["bad_nodes"]] == ["n2"]
    assert contract.read_record(rank_progress.declared_url(stage))["error"] == status["error"]
    assert rundir.exists(rank_progress.dump_url(stage, 0))


def test_straggler_action_fail_is_refused_without_the_watchdog_and_reaches_the_ranks() -> None:
    with pytest.raises(ValidationError, match="straggler_action"):
        ResourcesSpec(straggler_action="fail", hang_timeout_s=0)
    env = network_env(ResourcesSpec(straggler_action="fail"))
    assert env[rank_progress.STRAGGLER_ACTION_ENV] == "fail"
    assert rank_progress.STRAGGLER_ACTION_ENV not in network_env(ResourcesSpec())


def test_the_median_of_the_other_ranks_is_the_median_of_the_rest() -> None:
    rng = random.Random(0)
    for n in (2, 3, 4, 7, 64):
        values = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(n)]
        ordered = sorted(values)
        for i, v in enumerate(values):
            assert rank_progress.median_without(ordered, v) == statistics.median(values[:i] + values[i + 1 :])
