"""A local Ray head for tests: explicit free ports, a private HOME and temp dir, stopped by PID.

`ray start --head --block` runs as a child of the test process in its own process group; stopping sends TERM to
the head's PID, then KILL to what is left of its process group after a short grace period. Never `ray stop`, which would
stop every Ray cluster on the machine. The private HOME keeps a `~/.ray/auth_token` of another user of the
machine from switching token authentication on.

    pytest -m ray            # fixture `ray_cluster`; sets RAY_ADDRESS (the dashboard URL) for the session
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.clusters import free_ports, port_open, require_module, wait_until

INSTALL_HINT = '.ci/install_clusters.sh (pip install "ray[default,train]")'
NUM_CPUS = 2
WORKER_PORTS = 64
START_TIMEOUT_S = 90.0
STOP_GRACE_S = 5.0
PORT_NAMES = (
    "gcs",
    "dashboard",
    "node_manager",
    "object_manager",
    "client_server",
    "dashboard_agent_listen",
    "dashboard_agent_grpc",
    "metrics_export",
    "runtime_env_agent",
)


@dataclass
class RayCluster:
    """A running local Ray head: its addresses, private directories and process."""

    root: Path
    ports: dict[str, int]
    proc: subprocess.Popen[bytes]

    @property
    def address(self) -> str:
        """The dashboard URL, for `JobSubmissionClient` and RAY_ADDRESS."""
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def gcs_address(self) -> str:
        """The GCS address, for `ray.init(address=...)`."""
        return f"127.0.0.1:{self.ports['gcs']}"

    @property
    def pid(self) -> int:
        """PID of `ray start --block` (also its process group id)."""
        return self.proc.pid

    @property
    def env(self) -> dict[str, str]:
        """Environment of the head, its jobs and the test's clients."""
        return {
            **os.environ,
            "HOME": str(self.root / "home"),
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
        }


def ray_executable() -> str:
    """The `ray` script of the interpreter running the tests."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def dashboard_ready(c: RayCluster) -> bool:
    """The head is alive and the job API answers."""
    if c.proc.poll() is not None:
        out = (c.root / "ray-start.out").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"ray start exited with {c.proc.returncode}:\n{out}")
    if not port_open(c.ports["dashboard"]):
        return False
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(c.address).list_jobs()
    except Exception:
        return False
    return True


def start_ray(root: Path, num_cpus: int = NUM_CPUS) -> RayCluster:
    """Start a Ray head under `root` on free ports; return once its job API answers."""
    ports = free_ports(len(PORT_NAMES) + WORKER_PORTS)
    named = dict(zip(PORT_NAMES, ports))
    (root / "home").mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    argv = [
        ray_executable(), "start", "--head", "--block", f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--temp-dir={root / 'tmp'}", "--object-store-memory=200000000", "--disable-usage-stats",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--port={named['gcs']}",
        f"--dashboard-port={named['dashboard']}", f"--node-manager-port={named['node_manager']}",
        f"--object-manager-port={named['object_manager']}", f"--ray-client-server-port={named['client_server']}",
        f"--dashboard-agent-listen-port={named['dashboard_agent_listen']}",
        f"--dashboard-agent-grpc-port={named['dashboard_agent_grpc']}",
        f"--metrics-export-port={named['metrics_export']}", f"--runtime-env-agent-port={named['runtime_env_agent']}",
        f"--worker-port-list={','.join(map(str, ports[len(PORT_NAMES):]))}",
    ]  # fmt: skip
    out = open(root / "ray-start.out", "ab")  # noqa: SIM115 -- the child keeps it open
    try:
        env = {**os.environ, "HOME": str(root / "home"), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    finally:
        out.close()
    c = RayCluster(root=root, ports=named, proc=proc)
    try:
        wait_until(lambda: dashboard_ready(c), START_TIMEOUT_S, "the Ray dashboard", interval_s=0.3)
    except BaseException:
        stop_ray(c)
        raise
    return c


def stop_ray(c: RayCluster) -> None:
    """TERM the head by its PID, then KILL whatever is left of its process group after a short grace period."""
    if c.proc.poll() is None:
        c.proc.terminate()
        try:
            c.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            # The head stops its processes one after another; past the grace period, end them all at once.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(c.pid, signal.SIGKILL)
            c.proc.wait(timeout=STOP_GRACE_S)
    # The dashboard's forkserver children outlive the head; they are still in its process group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(c.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    """A local Ray head for the whole test session; RAY_ADDRESS points at its dashboard meanwhile."""
    require_module("ray", INSTALL_HINT)
    # Unix socket paths under the temp dir must stay short (about 100 characters), so not under pytest's tmp.
    root = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    t0 = time.perf_counter()
    cluster = start_ray(root)
    print(f"\nray_cluster: started in {time.perf_counter() - t0:.1f} s at {cluster.address} (pid {cluster.pid})")
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_ADDRESS", cluster.address)
    mp.setenv("RAY_AUTH_MODE", "disabled")
    try:
        yield cluster
    finally:
        mp.undo()
        t0 = time.perf_counter()
        stop_ray(cluster)
        print(f"\nray_cluster: stopped in {time.perf_counter() - t0:.1f} s")
        shutil.rmtree(root, ignore_errors=True)
