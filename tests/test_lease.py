"""The stage lease: exclusive generations, takeover of dead, expired and released owners, fencing of a lost owner."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from extrema import entry
from extrema.run import contract, lease, rundir
from tests.stage_runs import make_run


def _race(stage_dir: str, barrier: object, out: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    got = lease.try_acquire(stage_dir)
    out.put((os.getpid(), isinstance(got, lease.Lease), getattr(got, "generation", None)))  # type: ignore[attr-defined]
    time.sleep(1.0)  # stay alive (the lease is live) until every racer has looked


@pytest.mark.parametrize("root", ["file", "memory"])
def test_one_of_many_racing_attempts_wins(tmp_path: Path, root: str) -> None:
    if root == "memory":  # one process: threads race instead
        import threading

        stage = f"memory://lease-{uuid.uuid4().hex}/s"
        results: list[object] = []
        start = threading.Barrier(8)

        def go() -> None:
            start.wait()
            results.append(lease.try_acquire(stage))

        threads = [threading.Thread(target=go) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(isinstance(r, lease.Lease) for r in results) == 1
        assert lease.generations(stage) == [1]
        return
    stage = str(tmp_path / "s")
    ctx = mp.get_context("fork")
    barrier, out = ctx.Barrier(6), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(stage, barrier, out)) for _ in range(6)]
    for p in procs:
        p.start()
    got = [out.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    winners = [g for g in got if g[1]]
    assert len(winners) == 1, got
    assert lease.generations(stage) == [1]
    assert lease.current(stage).pid == winners[0][0]  # type: ignore[union-attr]


def test_dead_owner_is_taken_over_at_once_and_released_owner_too(tmp_path: Path) -> None:
    stage = str(tmp_path / "s")
    child = subprocess.Popen([sys.executable, "-c", f"from extrema.run import lease; lease.try_acquire({stage!r})"])
    assert child.wait(timeout=60) == 0
    holder = lease.current(stage)
    assert holder is not None and holder.pid == child.pid
    assert "is gone" in (holder.why_free() or "")
    mine = lease.try_acquire(stage)
    assert isinstance(mine, lease.Lease) and mine.generation == 2
    assert lease.live_holder(stage) is not None
    mine.release("completed")
    assert lease.live_holder(stage) is None
    again = lease.try_acquire(stage)
    assert isinstance(again, lease.Lease) and again.generation == 3
    assert lease.generations(stage) == [2, 3]  # older generations are pruned, the previous one kept


def test_expired_heartbeat_is_taken_over_and_the_old_owner_is_fenced(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EXTREMA_LEASE_TTL_S", "1")
    stage = str(tmp_path / "s")
    old = lease.try_acquire(stage)
    assert isinstance(old, lease.Lease)
    assert isinstance(lease.try_acquire(stage), lease.Holder)  # live: refused
    old.record["heartbeat_at"] = time.time() - 5  # as a frozen owner on another host would look
    old.record["host"] = "elsewhere"
    rundir.write_json(old.url, old.record)
    new = lease.try_acquire(stage)
    assert isinstance(new, lease.Lease) and new.generation == 2
    with pytest.raises(lease.LeaseLost, match="taken over"):
        old.fence("checkpoint")
    with pytest.raises(lease.LeaseLost):
        old.renew()
    new.fence("checkpoint")


def test_an_owner_that_cannot_renew_within_its_ttl_refuses_to_commit(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EXTREMA_LEASE_TTL_S", "1")
    stage = str(tmp_path / "s")
    mine = lease.try_acquire(stage)
    assert isinstance(mine, lease.Lease)
    mine.renewed -= 5  # its last heartbeat got through long ago
    (tmp_path / "s" / "lease").chmod(0o500)
    os.chmod(mine.url.removeprefix("file://"), 0o400)
    try:
        if os.geteuid() == 0:  # root writes through permissions: make the store unreachable instead
            monkeypatch.setattr(rundir, "write_json", _unreachable)
        with pytest.raises(lease.LeaseLost, match="cannot renew"):
            mine.fence("result")
    finally:
        (tmp_path / "s" / "lease").chmod(0o700)


def _unreachable(url: str, obj: object) -> None:
    raise ConnectionError("store unreachable")


def test_a_failure_after_a_takeover_ends_as_the_lost_lease(tmp_path: Path) -> None:
    """What a frozen attempt trips over once it continues (its successor pruned the step it was writing) is the lost
    stage, not the stage's failure: exit EXIT_LEASE_LOST, nothing recorded."""
    stage = str(tmp_path / "s")
    mine = lease.try_acquire(stage)
    assert isinstance(mine, lease.Lease)
    pruned = FileNotFoundError(2, "No such file or directory", "s/ckpt/step-4/__0_ab_0.distcp")
    assert entry.taken_over(mine, pruned) is None  # still its own: the failure stands
    rundir.write_json(rundir.join(lease.lease_dir(stage), f"{mine.generation + 1:08d}.json"), {"token": "x"})
    lost = entry.taken_over(mine, pruned)
    assert isinstance(lost, lease.LeaseLost) and "taken over" in str(lost)
    assert entry.ending(lost) == ("lease lost", contract.EXIT_LEASE_LOST)
    assert entry.taken_over(None, pruned) is None


def test_a_frozen_attempt_that_lost_its_stage_commits_nothing(tmp_path: Path) -> None:
    """SIGSTOP a real pretrain past the TTL, let a second attempt take the stage over and finish; the first,
    continued, stops with EXIT_LEASE_LOST and neither its status nor its result reaches the store."""
    make_run(str(tmp_path), {"pretrain": {"steps": 60, "ckpt_every": 2, "log_every": 1}})
    env = {**os.environ, "EXTREMA_LEASE_TTL_S": "3", "EXTREMA_LEASE_HEARTBEAT_S": "0.5", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "extrema.entry", str(tmp_path), "pretrain"]
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "pretrain" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(rundir.read_jsonl(str(metrics))) < 3:
        assert first.poll() is None, first.stdout.read() if first.stdout else ""
        time.sleep(0.1)
    first.send_signal(signal.SIGSTOP)
    try:
        time.sleep(4.0)  # past the TTL
        second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 0, second.stderr[-3000:]
        status = contract.read_status(str(tmp_path / "pretrain"))
        assert (status["state"], status["attempts"], status["lease_generation"]) == ("completed", 2, 2)
        result = (tmp_path / "pretrain" / "result.json").read_bytes()
    finally:
        first.send_signal(signal.SIGCONT)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == contract.EXIT_LEASE_LOST, out[-3000:]
    assert "taken over" in out
    assert contract.read_status(str(tmp_path / "pretrain"))["state"] == "completed"
    assert (tmp_path / "pretrain" / "result.json").read_bytes() == result
    gens = [json.loads(p.read_text()) for p in sorted((tmp_path / "pretrain" / "lease").glob("*.json"))]
    assert [g["attempt"] for g in gens] == [1, 2] and gens[1]["outcome"] == "completed"
