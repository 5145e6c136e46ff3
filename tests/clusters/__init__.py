"""Real clusters for tests: a private Slurm (`tests.clusters.slurm`) and a local Ray head (`tests.clusters.ray`),
and both again as two nodes, and as four, on a private network of this machine (`tests.clusters.slurm_nodes`,
`tests.clusters.ray_nodes`, on `tests.clusters.netns`).

All are pytest fixtures loaded from `tests/conftest.py` through `pytest_plugins`: the Slurm ones of one and two
nodes are session-scoped (idle, they cost nothing); the Ray ones and the four-node Slurm live as long as the test
module that asks for them. What a cluster needs and cannot find (a binary, root, a Python package, the right to
create network namespaces) skips its tests with the reason, except under CI (`CI=true`), where it fails them. The
single-node fixtures set SLURM_CONF and RAY_ADDRESS while they live; the multi-node ones set nothing: pass their
`env` or address explicitly.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import time
from collections.abc import Callable, Sequence

import pytest

from launch.backends.ray.head import free_ports  # noqa: F401  (re-exported for the fixtures)


def in_ci() -> bool:
    """Whether the tests run under CI, where a missing cluster component is an error."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Fail (under CI) or skip (elsewhere) the requesting test with the reason."""
    if in_ci():
        pytest.fail(f"{reason} (required under CI=true)", pytrace=False)
    pytest.skip(reason)


def require_binaries(names: Sequence[str], install_hint: str) -> None:
    """Every named executable is on PATH, else fail/skip naming the missing ones."""
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        unavailable(f"missing {', '.join(missing)}; install with {install_hint}")


def require_module(name: str, install_hint: str) -> None:
    """The named Python module is importable, else fail/skip."""
    if importlib.util.find_spec(name) is None:
        unavailable(f"Python module {name!r} is not installed; install with {install_hint}")


def require_root(what: str) -> None:
    """The tests run as root, else fail/skip."""
    if os.geteuid() != 0:
        unavailable(f"{what} runs its daemons as root; the tests run as uid {os.geteuid()}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    """Poll until the predicate holds; TimeoutError naming `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
