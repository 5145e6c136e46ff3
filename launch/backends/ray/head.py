"""A local Ray head started for one sweep: explicit free ports, a private HOME and temp dir, stopped by its PID.

`extrema-launch sweep --backend ray` without a cluster address (neither `launcher.ray_address` nor RAY_ADDRESS)
starts one with `start_head()`, submits to it, shows progress until the stages end, and stops it with
`stop_head()`. The head is `ray start --head --block`, a child in its own process group: stopping sends TERM to
its PID, then KILL to what is left of the group after a grace period. Never `ray stop`, which would stop every
Ray cluster of the machine. Every port is given explicitly (none of Ray's defaults, so another Ray on this machine
is neither reached nor disturbed), and the private HOME keeps another user's `~/.ray` settings out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 120.0
STOP_GRACE_S = 5.0
WORKER_PORTS = 64
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
class RayHead:
    """A running local Ray head: its directory, ports and process."""

    root: Path
    ports: dict[str, int]
    proc: subprocess.Popen[bytes]
    host: str

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

    def record(self) -> dict[str, str | int]:
        """What the run store keeps about the head, so that other processes can tell whether it still runs."""
        return {"address": self.address, "pid": self.pid, "host": self.host}


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_executable() -> str:
    """The `ray` script of this interpreter."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


def head_env(root: Path, gcs_address: str | None = None) -> dict[str, str]:
    """The environment of a node and of every process it starts: a private HOME, no token auth, no usage stats,
    and RAY_ADDRESS naming its own cluster (Ray's internal clients otherwise look for "the" Ray of the machine and
    give up when they find two)."""
    env = {**os.environ, "HOME": str(root / "home"), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    if gcs_address:
        env["RAY_ADDRESS"] = gcs_address
    else:
        env.pop("RAY_ADDRESS", None)
    return env


def head_argv(root: Path, ports: list[int], num_cpus: int | None, object_store_bytes: int | None) -> list[str]:
    """`ray start --head --block` with every port named and the temp dir under `root`."""
    named = dict(zip(PORT_NAMES, ports))
    argv = [
        ray_executable(), "start", "--head", "--block", "--disable-usage-stats", f"--temp-dir={root / 'tmp'}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--port={named['gcs']}",
        f"--dashboard-port={named['dashboard']}", f"--node-manager-port={named['node_manager']}",
        f"--object-manager-port={named['object_manager']}", f"--ray-client-server-port={named['client_server']}",
        f"--dashboard-agent-listen-port={named['dashboard_agent_listen']}",
        f"--dashboard-agent-grpc-port={named['dashboard_agent_grpc']}",
        f"--metrics-export-port={named['metrics_export']}", f"--runtime-env-agent-port={named['runtime_env_agent']}",
        f"--worker-port-list={','.join(map(str, ports[len(PORT_NAMES):]))}",
    ]  # fmt: skip
    if num_cpus is not None:
        argv.append(f"--num-cpus={num_cpus}")
    if object_store_bytes is not None:
        argv.append(f"--object-store-memory={object_store_bytes}")
    return argv


def _ready(head: RayHead) -> bool:
    if head.proc.poll() is not None:
        out = (head.root / "ray-start.out").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"ray start exited with {head.proc.returncode}:\n{out}")
    from ray.job_submission import JobSubmissionClient

    try:
        JobSubmissionClient(head.address).list_jobs()
    except Exception:
        return False
    return True


def start_head(
    root: Path | None = None,
    num_cpus: int | None = None,
    object_store_bytes: int | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> RayHead:
    """Start a Ray head under `root` (a fresh short temp dir when None); return once its job API answers."""
    # Ray's Unix socket paths live under the temp dir and must stay short (about 100 characters).
    root = Path(tempfile.mkdtemp(prefix="extrema-ray-", dir="/tmp")) if root is None else root
    (root / "home").mkdir(parents=True, exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    ports = free_ports(len(PORT_NAMES) + WORKER_PORTS)
    with open(root / "ray-start.out", "ab") as out:
        proc = subprocess.Popen(
            head_argv(root, ports, num_cpus, object_store_bytes),
            env=head_env(root, f"127.0.0.1:{ports[0]}"),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    head = RayHead(root, dict(zip(PORT_NAMES, ports)), proc, socket.gethostname())
    try:
        deadline = time.monotonic() + timeout_s
        while not _ready(head):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the local Ray head did not answer within {timeout_s:.0f} s (see {root})")
            time.sleep(0.3)
    except BaseException:
        stop_head(head, remove=False)
        raise
    return head


def stop_head(head: RayHead, remove: bool = True) -> None:
    """TERM the head by its PID, KILL what is left of its process group after a grace period; remove its dir."""
    if head.proc.poll() is None:
        head.proc.terminate()
        try:
            head.proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            head.proc.wait(timeout=STOP_GRACE_S)
    # Workers and the dashboard's forkserver children can outlive the head; they are still in its process group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(head.pid, signal.SIGKILL)
    if remove:
        shutil.rmtree(head.root, ignore_errors=True)


def head_gone(record: dict[str, object], host: str | None = None) -> bool:
    """Whether a head recorded by `RayHead.record()` is known to have stopped (its PID is gone on this host)."""
    if record.get("host") != (host or socket.gethostname()) or not isinstance(record.get("pid"), int):
        return False
    try:
        os.kill(int(record["pid"]), 0)  # type: ignore[call-overload]
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
