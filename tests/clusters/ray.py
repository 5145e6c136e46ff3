"""A local Ray head for tests: the launcher's own `launch.backends.ray.head` (explicit free ports, a private HOME
and temp dir, stopped by PID; never `ray stop`), with two CPUs and a small object store.

    pytest -m ray            # fixture `ray_cluster`; sets RAY_ADDRESS (the dashboard URL) meanwhile

Module-scoped, like every Ray fixture here: an idle Ray head keeps its dashboard, agents and log monitor busy (about
a tenth of one core measured beside a test suite), which a session-long cluster would take from every later test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from launch.backends.ray.head import RayHead, start_head, stop_head
from tests.clusters import require_module

INSTALL_HINT = '.ci/install_clusters.sh (pip install "ray[default,train]")'
NUM_CPUS = 2
OBJECT_STORE_BYTES = 200_000_000
RayCluster = RayHead


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    """A local Ray head for one test module; RAY_ADDRESS points at its dashboard meanwhile."""
    require_module("ray", INSTALL_HINT)
    t0 = time.perf_counter()
    cluster = start_head(num_cpus=NUM_CPUS, object_store_bytes=OBJECT_STORE_BYTES)
    print(f"\nray_cluster: started in {time.perf_counter() - t0:.1f} s at {cluster.address} (pid {cluster.pid})")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_ADDRESS", cluster.address)
    mp.setenv("RAY_AUTH_MODE", "disabled")
    try:
        yield cluster
    finally:
        mp.undo()
        t0 = time.perf_counter()
        stop_head(cluster)
        print(f"\nray_cluster: stopped in {time.perf_counter() - t0:.1f} s")
