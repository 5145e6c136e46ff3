"""The ranks of one node forked from one process (`extrema.entry --processes N`, extrema.train.local_ranks): they
meet at the parent's store and run collectives, a failed rank stops the others and names the exit code, a requeue
is kept, signals sent to the parent reach every rank, and ranks die with the parent. Real forks, real gloo."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest

from extrema.run import contract
from extrema.train.local_ranks import outcome, rank_env

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from datetime import timedelta
    from extrema.train.local_ranks import run_ranks

    out, scenario = sys.argv[1], sys.argv[2]
    if scenario == "collective":  # imported once, before the fork, as extrema.entry does
        import torch, torch.distributed as dist

    def note(**kw):
        rank = int(os.environ["RANK"])
        path = os.path.join(out, f"{scenario}.{rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"pid": os.getpid(), "ppid": os.getppid(), **kw}, f)
        os.replace(path + ".tmp", path)  # whole when it appears: another rank may act on it

    def collective():
        dist.init_process_group("gloo")
        t = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(t)
        note(sum=t.item(), world=dist.get_world_size(), port=os.environ["MASTER_PORT"], threads=torch.get_num_threads())
        dist.destroy_process_group()
        return 0

    def one_fails():
        if os.environ["RANK"] == "1":  # fails once the others are running (have written their records)
            others = [os.path.join(out, f"{scenario}.{r}.json") for r in (0, 2)]
            deadline = time.monotonic() + 60
            while not all(os.path.exists(p) for p in others) and time.monotonic() < deadline:
                time.sleep(0.05)
            return 5
        note()
        time.sleep(60)
        return 0

    def requeue():
        return 3 if os.environ["RANK"] == "0" else 0

    def signalled():
        got = []
        signal.signal(signal.SIGUSR2, lambda s, f: got.append(s))
        note()
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        return 3 if got else 1

    def sleeper():
        note()
        time.sleep(60)
        return 0

    body = {"collective": collective, "one_fails": one_fails, "requeue": requeue, "signalled": signalled,
            "sleeper": sleeper}[scenario]
    print("ranks ended:", run_ranks(3, body, timedelta(seconds=30)), flush=True)
    """
)


def start(tmp_path: Path, scenario: str) -> subprocess.Popen[str]:
    """The script as its own process (ranks forked from it), its output piped; OMP_NUM_THREADS unset."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path), scenario], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=env,
    )  # fmt: skip


def notes(tmp_path: Path, scenario: str, count: int, timeout: float = 60) -> list[dict]:
    """The records `count` ranks of a scenario wrote, waited for."""
    deadline = time.monotonic() + timeout
    paths = [tmp_path / f"{scenario}.{r}.json" for r in range(count)]
    while not all(p.exists() and p.stat().st_size for p in paths):
        assert time.monotonic() < deadline, f"ranks of {scenario} never wrote their records"
        time.sleep(0.05)
    return [json.loads(p.read_text()) for p in paths]


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_the_exit_code_is_the_first_failure_else_a_requeue_else_zero() -> None:
    ok, requeue = contract.EXIT_OK, contract.EXIT_REQUEUE
    assert outcome([ok, ok]) == ok
    assert outcome([ok, requeue, ok]) == requeue
    assert outcome([requeue, 5, 7]) == 5
    assert outcome([ok, -signal.SIGKILL]) == 128 + signal.SIGKILL
    assert outcome([contract.EXIT_LEASE_LOST, requeue]) == contract.EXIT_LEASE_LOST
    env = rank_env(2, 4, 12345)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("2", "2", "4", "4")
    assert env["MASTER_PORT"] == "12345" and env["TORCHELASTIC_USE_AGENT_STORE"] == "True"


def test_forked_ranks_meet_at_the_parents_store_and_reduce(tmp_path: Path) -> None:
    proc = start(tmp_path, "collective")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "ranks ended: 0" in out, out
    records = notes(tmp_path, "collective", 3, timeout=1)
    assert [r["sum"] for r in records] == [6.0, 6.0, 6.0]  # 1 + 2 + 3 on every rank
    assert {r["world"] for r in records} == {3} and len({r["port"] for r in records}) == 1
    assert {r["threads"] for r in records} == {1}, "one intra-op thread a rank, as under torchrun"
    assert {r["ppid"] for r in records} == {proc.pid} and len({r["pid"] for r in records}) == 3


def test_a_failed_rank_stops_the_others_and_its_code_is_the_parents(tmp_path: Path) -> None:
    proc = start(tmp_path, "one_fails")
    t0 = time.monotonic()
    out, _ = proc.communicate(timeout=120)
    assert "ranks ended: 5" in out, out
    assert time.monotonic() - t0 < 30, "the sleeping ranks were stopped, not waited for"
    others = [json.loads((tmp_path / f"one_fails.{r}.json").read_text()) for r in (0, 2)]
    assert not any(alive(r["pid"]) for r in others)


def test_a_requeue_is_kept_and_a_signal_to_the_parent_reaches_every_rank(tmp_path: Path) -> None:
    proc = start(tmp_path, "requeue")
    out, _ = proc.communicate(timeout=120)
    assert f"ranks ended: {contract.EXIT_REQUEUE}" in out, out
    proc = start(tmp_path, "signalled")
    notes(tmp_path, "signalled", 3)
    proc.send_signal(signal.SIGUSR2)  # to the parent alone: it forwards
    out, _ = proc.communicate(timeout=120)
    assert f"ranks ended: {contract.EXIT_REQUEUE}" in out, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_ranks_die_with_their_parent(tmp_path: Path) -> None:
    proc = start(tmp_path, "sleeper")
    ranks = [r["pid"] for r in notes(tmp_path, "sleeper", 3)]
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(p) for p in ranks), "a rank outlived the process that forked it"


def test_the_store_timeout_is_the_collective_timeout() -> None:
    from extrema.train import local_ranks

    store = local_ranks._store(timedelta(seconds=7))
    assert store is not None and store.port > 0 and store.timeout == timedelta(seconds=7)
