"""The ranks of one node forked from one process that imported the stage once (`python -m extrema.entry
--processes N`), in place of torchrun, which imports torch in its agent and then once more in every rank.

Each rank is a child forked before anything but imports ran (no run-store access, no threads of our own); it
reads the rendezvous port from a pipe, sets the variables torchrun would (RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT, the agent store's TORCHELASTIC_USE_AGENT_STORE /
TORCHELASTIC_RESTART_COUNT; one intra-op thread unless OMP_NUM_THREADS is set) and runs the stage. The parent
hosts the ranks' TCP store (bound to a free port, so no port is guessed), forwards the signals a launcher sends
(SIGTERM, SIGINT, SIGUSR1, SIGUSR2) to every rank, and when a rank fails stops the others (SIGTERM, then SIGKILL
after `STOP_GRACE_S`). Its exit code: the first failed rank's, else EXIT_REQUEUE when a rank stopped to be
requeued, else 0. Ranks die with the parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from types import FrameType
from typing import Any

from extrema.run import contract

STOP_GRACE_S = 30.0  # as torchrun: a failed rank's peers get this long after SIGTERM before SIGKILL
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
PR_SET_PDEATHSIG = 1
POLL_S = 0.05


def rank_env(rank: int, ranks: int, port: int) -> dict[str, str]:
    """The variables rank `rank` of `ranks` on this node reads (as torchrun sets them) for a store on `port`."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "GROUP_RANK": "0",
        "WORLD_SIZE": str(ranks),
        "LOCAL_WORLD_SIZE": str(ranks),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "TORCHELASTIC_USE_AGENT_STORE": "True",  # rank 0 joins the parent's store instead of hosting one
        "TORCHELASTIC_RESTART_COUNT": "0",
    }


def outcome(codes: list[int]) -> int:
    """The parent's exit code from its ranks' in the order they ended: the first failure (a signal's death as
    128 + its number), else EXIT_REQUEUE when any rank stopped to be requeued, else 0."""
    failed = [c for c in codes if c not in (contract.EXIT_OK, contract.EXIT_REQUEUE)]
    if failed:
        return failed[0] if failed[0] > 0 else 128 - failed[0]
    return contract.EXIT_REQUEUE if contract.EXIT_REQUEUE in codes else contract.EXIT_OK


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when the process that forked it ends (Linux; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return


def one_thread_unless_set() -> None:
    """One intra-op thread in this rank unless OMP_NUM_THREADS says otherwise, as torchrun sets it for several
    ranks (torch read the variable when the parent imported it, so the count is set here as well)."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _child(rank: int, ranks: int, port_pipe: int, body: Callable[[], int], parent: int) -> None:
    """In a forked rank: wait for the store's port, then run `body` and end with its exit code."""
    code = 1
    try:
        die_with_parent()
        if os.getppid() != parent:  # the parent ended before the kernel was told to end this rank with it
            return
        with os.fdopen(port_pipe, "rb") as pipe:
            line = pipe.readline().strip()
        if not line.isdigit():
            print(f"extrema.entry: rank {rank}: no rendezvous from the parent process", file=sys.stderr, flush=True)
            return
        os.environ.update(rank_env(rank, ranks, int(line)))
        one_thread_unless_set()
        code = body()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


def run_ranks(ranks: int, body: Callable[[], int], timeout: timedelta) -> int:
    """Run `body` as ranks 0..ranks-1 of one node, each in a child forked from this process; the exit code
    (`outcome`) once every rank has ended."""
    sys.stdout.flush()
    sys.stderr.flush()
    children: list[int] = []  # pids
    writers: list[int] = []
    parent = os.getpid()
    for rank in range(ranks):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(write_end)
            for w in writers:  # another rank's pipe stays open only in the parent, so its reader sees the end
                os.close(w)
            _child(rank, ranks, read_end, body, parent)
        os.close(read_end)
        writers.append(write_end)
        children.append(pid)
    return _supervise(children, writers, timeout)


def _supervise(children: list[int], writers: list[int], timeout: timedelta) -> int:
    """Host the ranks' store, send them its port, forward signals, stop the rest when one fails; the exit code."""
    live = set(children)

    def forward(signum: int, frame: FrameType | None) -> None:
        for pid in live:
            _signal(pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    codes: list[int] = []
    stop_at: float | None = None
    try:
        store = _store(timeout)
        port = str(store.port).encode() + b"\n" if store is not None else b"\n"
        for w in writers:
            with contextlib.suppress(OSError):  # that rank is already gone: its end is reaped below
                os.write(w, port)
            os.close(w)
        while live:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored): their codes are lost
                codes += [1] * len(live)
                break
            if pid == 0:
                if stop_at is not None and time.monotonic() >= stop_at:
                    for other in live:
                        _signal(other, signal.SIGKILL)
                    stop_at = None
                time.sleep(POLL_S)
                continue
            if pid not in live:
                continue
            live.remove(pid)
            code = os.waitstatus_to_exitcode(status)
            codes.append(code)
            if code not in (contract.EXIT_OK, contract.EXIT_REQUEUE) and stop_at is None and live:
                for other in live:
                    _signal(other, signal.SIGTERM)
                stop_at = time.monotonic() + STOP_GRACE_S
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return outcome(codes)


def _signal(pid: int, sig: int) -> None:
    """Send `sig` to `pid` unless it has already ended."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _store(timeout: timedelta) -> Any | None:
    """The ranks' TCP store on a free port of this host (None, printed, when it cannot be made: the ranks end)."""
    try:
        from torch.distributed import TCPStore

        return TCPStore("127.0.0.1", 0, None, is_master=True, timeout=timeout, wait_for_workers=False)
    except Exception as e:  # the ranks read no port and end with an error
        print(f"extrema.entry: cannot start the ranks' rendezvous store: {e}", file=sys.stderr, flush=True)
        return None
