"""A Ray cluster of nodes on one machine: the head on n1 and a worker on n2 (and n3, n4) of a `tests.clusters.netns`
network.

Each node is `ray start --block` run on its node with the launcher's `head_env` (a private HOME, no token auth, no
usage stats), its own temp dir, `--node-ip-address` and explicit non-default ports, and two CPUs (so that only a
placement strategy, not the CPU count, forces work onto distinct nodes). The head's dashboard listens on every
address, so the job API answers from the test process at `address`. Stopped by PID (never `ray stop`): each
node's process tree gets TERM, then KILL, then whatever is left in the namespaces is killed.

    pytest -m ray            # fixture `ray_two_nodes`, `ray_four_nodes` (one test module); RAY_ADDRESS is NOT set

Ray's clients prefer RAY_ADDRESS to the address they are given (`JobSubmissionClient(address)` and
`ray.init(address=...)` alike), and the single-node `ray_cluster` sets RAY_ADDRESS to its own head while it lives.
So a test of this cluster sets it for itself, `monkeypatch.setenv("RAY_ADDRESS", ray_two_nodes.address)`, and runs
job clients with `env=cluster.env` (RAY_ADDRESS: the dashboard URL) and `ray.init()` drivers, which may run in the
test's own namespace too, with `env=cluster.driver_env` (RAY_ADDRESS: the GCS address).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from launch.backends.ray.head import PORT_NAMES, WORKER_PORTS, free_ports, head_env, ray_executable
from tests.clusters import port_open, require_module, wait_until
from tests.clusters.netns import NodeNetwork, require_network, start_network, stop_network
from tests.clusters.ray import INSTALL_HINT

HEAD, WORKER = "n1", "n2"
NUM_CPUS = 2
OBJECT_STORE_BYTES = 200_000_000
START_TIMEOUT_S = 120.0
STOP_GRACE_S = 5.0
HEALTH_CHECK_FAILURES = 10  # missed health checks (3 s apart) before the GCS declares a node dead
# The ports a worker node needs too; the GCS, dashboard and Ray Client ports are the head's alone.
NODE_PORTS = tuple(p for p in PORT_NAMES if p not in ("gcs", "dashboard", "client_server"))


@dataclass
class RayNodes:
    """A running Ray cluster of nodes: its directory, network, ports and `ray start --block` processes."""

    root: Path
    net: NodeNetwork
    ports: dict[str, dict[str, int]]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def head_ip(self) -> str:
        """n1's address."""
        return self.net.nodes[HEAD].address

    @property
    def address(self) -> str:
        """The dashboard URL, for `JobSubmissionClient` and RAY_ADDRESS."""
        return f"http://{self.head_ip}:{self.ports[HEAD]['dashboard']}"

    @property
    def gcs_address(self) -> str:
        """The GCS address, for `ray.init(address=...)` in a process on a node."""
        return f"{self.head_ip}:{self.ports[HEAD]['gcs']}"

    @property
    def env(self) -> dict[str, str]:
        """The environment for job clients of this cluster (RAY_ADDRESS is its dashboard URL)."""
        return {**head_env(self.root), "RAY_ADDRESS": self.address}

    @property
    def driver_env(self) -> dict[str, str]:
        """The environment for a `ray.init()` driver, on a node or here (RAY_ADDRESS is the GCS address)."""
        return {**head_env(self.root), "RAY_ADDRESS": self.gcs_address}

    def alive_nodes(self) -> list[dict[str, object]]:
        """The nodes the GCS reports alive, as the dashboard lists them; empty while it does not answer."""
        try:
            with urllib.request.urlopen(f"{self.address}/nodes?view=summary", timeout=5) as r:
                summary = json.load(r)["data"]["summary"]
        except (OSError, ValueError, KeyError):
            return []
        return [n["raylet"] for n in summary if n.get("raylet", {}).get("state") == "ALIVE"]

    def kill_worker_node(self, name: str = WORKER) -> list[int]:
        """SIGKILL every process of a worker node (n2 unless named: the node dies); the PIDs killed."""
        killed = self.net.kill_node(name)
        self.procs[name].wait(timeout=STOP_GRACE_S)
        return killed

    def start_worker_node(self, name: str = WORKER) -> None:
        """Start a worker node (n2 unless named) again and wait until the GCS reports every node alive, one of them
        new."""
        before = {n["nodeId"] for n in self.alive_nodes()}
        start_node(self, name)

        def joined() -> bool:
            alive = self.alive_nodes()
            return len(alive) == len(self.net.nodes) and any(n["nodeId"] not in before for n in alive)

        wait_until(joined, START_TIMEOUT_S, "the Ray worker node to join", interval_s=0.5)


def start_node(c: RayNodes, name: str) -> None:
    """`ray start --block` on the node: the head on n1, a worker joining it elsewhere."""
    node_dir = c.root / name
    (node_dir / "home").mkdir(parents=True, exist_ok=True)
    (node_dir / "tmp").mkdir(exist_ok=True)
    # Fresh ports on every start: a restarted node must not wait for its predecessor's ports to be released.
    all_ports = free_ports(len(PORT_NAMES) + WORKER_PORTS)
    ports = c.ports[name] = dict(zip(PORT_NAMES, all_ports))
    workers = all_ports[len(PORT_NAMES) :]
    argv = [
        ray_executable(), "start", "--block", "--disable-usage-stats", f"--temp-dir={node_dir / 'tmp'}",
        f"--node-ip-address={c.net.nodes[name].address}", f"--num-cpus={NUM_CPUS}",
        f"--object-store-memory={OBJECT_STORE_BYTES}", f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        f"--dashboard-agent-listen-port={ports['dashboard_agent_listen']}",
        f"--dashboard-agent-grpc-port={ports['dashboard_agent_grpc']}",
        f"--metrics-export-port={ports['metrics_export']}", f"--runtime-env-agent-port={ports['runtime_env_agent']}",
        f"--worker-port-list={','.join(map(str, workers))}",
    ]  # fmt: skip
    if name == HEAD:
        argv += [
            "--head", f"--port={ports['gcs']}", "--include-dashboard=true", "--dashboard-host=0.0.0.0",
            f"--dashboard-port={ports['dashboard']}", f"--ray-client-server-port={ports['client_server']}",
        ]  # fmt: skip
    else:
        argv.append(f"--address={c.gcs_address}")
    env = {**head_env(node_dir, c.gcs_address), "TMPDIR": str(node_dir / "tmp"), "RAY_TMPDIR": str(node_dir / "tmp")}
    # A node is declared dead after this many missed health checks (3 s apart); Ray's 5 let a raylet starved of the
    # two shared cores by training be declared dead mid-retry. A killed node is still found dead in about 30 s.
    env["RAY_health_check_failure_threshold"] = str(HEALTH_CHECK_FAILURES)
    with open(node_dir / "ray-start.out", "ab") as out:
        c.procs[name] = subprocess.Popen(
            c.net.wrap(name, argv), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )


def check_running(c: RayNodes) -> None:
    """RuntimeError with its output when a `ray start` has exited."""
    for name, proc in c.procs.items():
        if proc.poll() is not None:
            out = (c.root / name / "ray-start.out").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"ray start on {name} exited with {proc.returncode}:\n{out}")


def gcs_listens(c: RayNodes) -> bool:
    """The head's GCS accepts connections from this (the root) namespace."""
    check_running(c)
    return port_open(c.ports[HEAD]["gcs"], c.head_ip)


def head_ready(c: RayNodes) -> bool:
    """The job API answers from this (the root) namespace."""
    check_running(c)
    # Plain HTTP: Ray's JobSubmissionClient would ask whatever cluster RAY_ADDRESS names instead of `address`.
    try:
        with urllib.request.urlopen(f"{c.address}/api/jobs/", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def start_ray_nodes(net: NodeNetwork) -> RayNodes:
    """Start the head on n1 and a worker on every other node; return once the job API answers and every node is
    alive."""
    # Ray's Unix socket paths live under the temp dirs and must stay short (about 100 characters).
    root = Path(tempfile.mkdtemp(prefix=f"extrema-ray{len(net.nodes)}-", dir="/tmp"))
    (root / "home").mkdir()
    c = RayNodes(root, net, {})
    try:
        start_node(c, HEAD)
        # The worker needs only the GCS; the dashboard comes up meanwhile.
        wait_until(lambda: gcs_listens(c), START_TIMEOUT_S, "the Ray head's GCS", interval_s=0.2)
        for name in list(net.nodes)[1:]:
            start_node(c, name)
        count = len(net.nodes)
        wait_until(lambda: head_ready(c) and len(c.alive_nodes()) == count, START_TIMEOUT_S, "alive Ray nodes", 0.3)
    except BaseException:
        stop_ray_nodes(c)
        raise
    return c


def process_tree(pid: int) -> list[int]:
    """The process and all its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def stop_ray_nodes(c: RayNodes) -> None:
    """TERM each `ray start --block`, then KILL its process tree and whatever is left on the nodes; remove its dir."""
    for name in reversed(c.net.nodes):
        proc = c.procs.get(name)
        if proc is None:
            continue
        # `ray start --block` does not always stop its node on TERM: collect the tree first, KILL it after a grace.
        tree = process_tree(proc.pid)
        if proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_GRACE_S)
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=STOP_GRACE_S)
        c.net.kill_node(name)
    shutil.rmtree(c.root, ignore_errors=True)


def running_ray_nodes(tmp_path_factory: pytest.TempPathFactory, count: int, fixture: str) -> Iterator[RayNodes]:
    """Start a network of `count` nodes and Ray on it (head on n1), yield the cluster, then stop both."""
    require_network()
    require_module("ray", INSTALL_HINT)
    t0 = time.perf_counter()
    net = start_network(tmp_path_factory.mktemp(f"ray{count}n"), count)
    try:
        cluster = start_ray_nodes(net)
    except BaseException:
        stop_network(net)
        raise
    pids = {name: p.pid for name, p in cluster.procs.items()}
    print(
        f"\n{fixture}: started in {time.perf_counter() - t0:.1f} s at {cluster.address} on bridge {net.bridge}"
        f" under {cluster.root} (pids {pids})"
    )
    try:
        yield cluster
    finally:
        t0 = time.perf_counter()
        try:
            stop_ray_nodes(cluster)
        finally:
            stop_network(net)
        print(f"\n{fixture}: stopped in {time.perf_counter() - t0:.1f} s")


@pytest.fixture(scope="module")
def ray_two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayNodes]:
    """A two-node Ray cluster (head on n1, worker on n2) for one test module (see `tests.clusters.ray`: an idle
    cluster costs CPU); RAY_ADDRESS is left alone."""
    yield from running_ray_nodes(tmp_path_factory, 2, "ray_two_nodes")


@pytest.fixture(scope="module")
def ray_four_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayNodes]:
    """A four-node Ray cluster (head on n1, workers on n2, n3, n4) for one test module; RAY_ADDRESS is left alone."""
    yield from running_ray_nodes(tmp_path_factory, 4, "ray_four_nodes")
