"""How loader workers start: from a fork server, never forked from the stage's process, with the environment their
loader was made in."""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import threading
import time
from multiprocessing import forkserver
from multiprocessing.context import BaseContext
from typing import Any

# What a fork server imports once, before it forks loader workers: the modules whose classes the workers unpickle.
WORKER_PRELOAD = ["extrema.data.loaders", "extrema.data.detection"]


def worker_context(num_workers: int) -> BaseContext | None:
    """How loader workers start: forked from a fork server, a single-threaded process that imported the data
    modules once, never from the stage's process. That one has threads (the collectives', the watchdog's, the lease
    heartbeat's, an object store's event loop) whose locks a child forked from it could find held and wait on for
    ever. None without workers."""
    if num_workers == 0:
        return None
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)
    return ctx


def start_worker_server(num_workers: int) -> None:
    """Start the fork server of this process's loader workers now, when there will be workers: it imports the data
    modules while the stage builds its model and restores its checkpoint, off the first batch's path."""
    if worker_context(num_workers) is not None:
        forkserver.ensure_running()


def _own_fork_server() -> None:
    """A child forked from a process that started a fork server starts its own (it cannot wait on its parent's)."""
    server: Any = getattr(forkserver, "_forkserver", None)  # the module's one server; its fields are private
    if getattr(server, "_forkserver_pid", None) is None:
        return
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
    server._forkserver_address = server._forkserver_alive_fd = server._forkserver_pid = None
    server._lock = threading.Lock()


os.register_at_fork(after_in_child=_own_fork_server)


class WorkerStart:
    """A loader worker's first acts: take the environment of the process that made the loader as it was then (a
    fork would have inherited it; a fork server's is as old as the server: a store's credentials set since are in
    the first, not the second); leave SIGTERM/SIGUSR2 to the training process, which saves a checkpoint before
    exiting; and end when that process ends, however it ends (the fork server is the worker's parent and lives as
    long as its workers do, so torch's own check of the parent would keep both for ever after a kill -9)."""

    def __init__(self) -> None:
        self.environ = dict(os.environ)
        self.loader_pid = os.getpid()

    def __call__(self, worker_id: int) -> None:
        os.environ.clear()
        os.environ.update(self.environ)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        end_with(self.loader_pid)


def end_with(pid: int) -> None:
    """End this process (a loader worker) when process `pid` ends: a thread waits on its pidfd, or polls it where
    the kernel has none."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(0)
    except (OSError, AttributeError):
        threading.Thread(target=_poll_until_gone, args=(pid,), name="extrema-loader-gone", daemon=True).start()
        return
    threading.Thread(target=_wait_until_gone, args=(fd,), name="extrema-loader-gone", daemon=True).start()


def _wait_until_gone(fd: int) -> None:
    select.select([fd], [], [])
    os._exit(0)


def _poll_until_gone(pid: int) -> None:
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass
        time.sleep(1.0)
