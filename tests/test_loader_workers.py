"""Loader workers start from a fork server, never forked from the stage's process: a lock another thread of the
stage holds (the watchdog's, the lease heartbeat's, gloo's, an object store's event loop) is not held in a worker, the
environment is the one the loader was made in, and a process forked after the server started still gets workers.
Real DataLoader workers, real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset

from extrema.data import loaders
from tests.s3server import REPO

HELD = threading.Lock()  # held by a thread of the "stage" while its loader starts workers
WAIT_S = 120.0


class NeedsTheLock(Dataset[torch.Tensor]):
    """Items made under HELD, as a worker that writes to stderr needs its lock, or one that imports a module."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> torch.Tensor:
        with HELD:
            return torch.tensor([i, os.getpid()])


class Environ(Dataset[str]):
    """The worker's value of one environment variable."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> str:
        return os.environ.get(self.name, "")


def within(seconds: float, fn: Callable[[], object]) -> object:
    """fn() run in a thread; AssertionError when it has not returned after `seconds` (a worker that hangs)."""
    box: list[object] = []
    t = threading.Thread(target=lambda: box.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert box, f"the loader's workers gave nothing in {seconds:.0f} s (a worker waits on a lock it inherited)"
    return box[0]


def test_a_worker_does_not_inherit_a_lock_another_thread_holds() -> None:
    release = threading.Event()
    holding = threading.Event()

    def hold() -> None:
        with HELD:
            holding.set()
            release.wait(WAIT_S + 30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert holding.wait(10)
    try:
        loader = loaders.ordered_loader(NeedsTheLock(), 2, 1)
        batches = within(WAIT_S, lambda: [b for b in loader])
    finally:
        release.set()
        holder.join(10)
    assert isinstance(batches, list)
    items = torch.cat(batches)
    assert items[:, 0].tolist() == [0, 1, 2, 3]
    assert set(items[:, 1].tolist()) != {os.getpid()}  # made in a worker, not here


def test_a_worker_sees_the_environment_its_loader_was_made_in() -> None:
    name = "EXTREMA_TEST_WORKER_ENV"
    os.environ[name] = "before"
    try:
        first = within(WAIT_S, lambda: list(loaders.ordered_loader(Environ(name), 2, 1)))  # the server starts now
        os.environ[name] = "after"  # as a test or a launcher sets a store's credentials later
        second = within(WAIT_S, lambda: list(loaders.ordered_loader(Environ(name), 2, 1)))
    finally:
        del os.environ[name]
    assert first == [["before", "before"]] and second == [["after", "after"]]


def test_a_process_forked_after_the_server_started_gets_workers_of_its_own() -> None:
    within(WAIT_S, lambda: list(loaders.ordered_loader(Environ("HOME"), 2, 1)))  # this process's server is up
    pid = os.fork()
    if pid == 0:  # the child: its own server, its own workers; exit code 0 only when they answered
        code = 1
        try:
            got = list(loaders.ordered_loader(NeedsTheLock(), 4, 1))
            code = 0 if torch.cat(got)[:, 0].tolist() == [0, 1, 2, 3] else 1
        finally:
            os._exit(code)
    deadline = time.monotonic() + WAIT_S
    while (ended := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    if ended[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert ended[0] == pid and os.waitstatus_to_exitcode(ended[1]) == 0, "the forked process's loader failed or hung"


KILLED_LOADER = """
import os, sys, time, torch
from torch.utils.data import Dataset
from extrema.data import loaders

class Pids(Dataset):
    def __len__(self): return 10_000
    def __getitem__(self, i): return torch.tensor([os.getpid(), os.getppid()])

if __name__ == "__main__":
    batches = iter(loaders.step_loader(Pids(), torch.utils.data.BatchSampler(range(10_000), 1, False), 2))
    pids = {tuple(next(batches)[0].tolist()) for _ in range(8)}
    print(" ".join(f"{w} {s}" for w, s in pids), flush=True)
    time.sleep(600)
"""


def test_workers_and_their_server_end_when_the_loaders_process_is_killed(tmp_path: Path) -> None:
    """kill -9 of the process that made the loader (a preempted rank): its workers and their fork server end too."""
    script = tmp_path / "killed_loader.py"
    script.write_text(KILLED_LOADER)
    proc = subprocess.Popen([sys.executable, str(script)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        pids = {int(p) for p in line}
        assert len(pids) >= 2 and proc.pid not in pids, line  # workers, and their server as their parent
        proc.kill()
        proc.wait(30)
        deadline = time.monotonic() + 30
        while (alive := [p for p in pids if Path(f"/proc/{p}").exists()]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive, f"still running 30 s after their loader's process was killed: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
