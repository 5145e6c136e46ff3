"""A private multi-node Slurm 22.05 with accounting on one machine: nodes n1, n2 (and n3, n4) of a
`tests.clusters.netns` network, each with its own slurmd, and slurmctld as host `ctl` on the bridge address.

munge, MariaDB and slurmdbd start as in `tests.clusters.slurm` and serve every node (a Unix socket and 127.0.0.1
are reachable from the controller). Each node has one CPU; a node that stops answering is noticed after
SlurmdTimeout (10 s) and comes back by itself once its slurmd registers again (ReturnToService=2).

    pytest -m slurm          # fixture `slurm_two_nodes` (partition "two"), `slurm_four_nodes` (partition "four",
                             # one test module); SLURM_CONF is NOT set for the session

SLURM_CONF stays whatever it was (the single-node `slurm_cluster` sets it to its own cluster): reach this cluster
with `cluster.run(...)` or pass `env=cluster.env` to every Slurm client (jobs inherit that environment); code that
reads os.environ (the launcher's Slurm backend) needs `monkeypatch.setenv("SLURM_CONF", str(cluster.conf))` in the
test.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from tests.clusters import require_binaries, wait_until
from tests.clusters.netns import NodeNetwork, require_network, start_network, stop_network
from tests.clusters.slurm import (
    CLIENTS,
    DAEMONS,
    INSTALL_HINT,
    MAX_ARRAY_SIZE,
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    SlurmCluster,
    alive,
    cluster_ports,
    slurm_conf,
    spawn,
    start_accounting,
    start_slurmctld,
    stop_slurm,
    write_confs,
)

PARTITION = "two"
FOUR = "four"
CPUS_PER_NODE = 1
MEMORY_MB_PER_NODE = 4000
SLURMD_TIMEOUT_S = 10
USABLE = ("idle", "mixed", "allocated")
# How long a restarted node may take to return to service by itself before it is resumed by hand.
RETURN_TO_SERVICE_S = 5.0


@dataclass(kw_only=True)
class SlurmNodes(SlurmCluster):
    """A running cluster of nodes: `SlurmCluster` plus its network and control over each node."""

    net: NodeNetwork

    @property
    def node_names(self) -> list[str]:
        """The nodes, in order: ["n1", "n2", ...]."""
        return list(self.net.nodes)

    def node_state(self, name: str) -> str:
        """The node's state as sinfo prints it (`idle`, `down*`, ...); empty when slurmctld does not answer."""
        return self.run("sinfo", "-h", "-N", "-n", name, "-o", "%T", check=False, timeout=10).stdout.strip()

    def registered_since(self, name: str, when: datetime) -> bool:
        """Whether the node's slurmd registered with slurmctld at or after `when` (whole seconds)."""
        out = self.run("scontrol", "-o", "show", "node", name, check=False, timeout=10).stdout
        field = next((f for f in out.split() if f.startswith("SlurmdStartTime=")), "=")
        try:
            return datetime.fromisoformat(field.split("=", 1)[1]) >= when
        except ValueError:
            return False

    def kill_node(self, name: str) -> list[int]:
        """SIGKILL slurmd and every other process of the node (its job steps too); the PIDs killed."""
        killed = self.net.kill_node(name)
        self.procs[f"slurmd.{name}"].wait(timeout=STOP_TIMEOUT_S)
        return killed

    def start_node(self, name: str) -> None:
        """Start the node's slurmd (again) and wait until sinfo shows the node usable."""
        daemon = f"slurmd.{name}"
        started = datetime.now().replace(microsecond=0)
        spawn(self, daemon, self.net.wrap(name, ["slurmd", "-D", "-N", name]))

        def usable() -> bool:
            return alive(self, daemon) and self.registered_since(name, started) and self.node_state(name) in USABLE

        try:
            wait_until(usable, RETURN_TO_SERVICE_S, f"{name} to return to service", interval_s=0.2)
        except TimeoutError:
            # A node killed while a job was completing stays COMPLETING (resume is refused) until slurmctld resends
            # the job's termination, a minute later; setting it DOWN first ends that at once.
            self.run("scontrol", "update", f"nodename={name}", "state=down", "reason=restarted", check=False)
            self.run("scontrol", "update", f"nodename={name}", "state=resume", check=False)
            wait_until(usable, START_TIMEOUT_S, f"{name} to be usable after resume", interval_s=0.2)

    def cut(self, name: str) -> None:
        """Take the node's link down."""
        self.net.cut(name)

    def restore(self, name: str) -> None:
        """Bring the node's link up again."""
        self.net.restore(name)


def start_slurm_nodes(
    root: Path, net: NodeNetwork, partition: str = PARTITION, max_array_size: int = MAX_ARRAY_SIZE
) -> SlurmNodes:
    """Start munge, MariaDB, slurmdbd, slurmctld (host ctl) and a slurmd on each node (one partition of all of
    them); return once every node is idle."""
    c = SlurmNodes(root=root, ports=cluster_ports(), partition=partition, max_array_size=max_array_size, net=net)
    nodes = {n.name: n.address for n in net.nodes.values()}
    write_confs(
        c,
        slurm_conf(
            c,
            nodes,
            CPUS_PER_NODE,
            MEMORY_MB_PER_NODE,
            controller=f"ctl({net.bridge_address})",
            slurmd_timeout=SLURMD_TIMEOUT_S,
        ),
    )
    for name in nodes:
        (root / "spool" / name).mkdir(parents=True, exist_ok=True)
    try:
        start_accounting(c)
        # slurmctld refuses to start unless its hostname is the one in SlurmctldHost.
        start_slurmctld(c, net.wrap_ctl(["slurmctld", "-D", "-i"]))
        for name in nodes:
            c.start_node(name)
    except BaseException:
        stop_slurm(c)
        raise
    return c


def running_slurm_nodes(
    tmp_path_factory: pytest.TempPathFactory, count: int, partition: str, fixture: str
) -> Iterator[SlurmNodes]:
    """Start a network of `count` nodes and Slurm on it, yield the cluster, then stop both and check nothing is left."""
    require_network()
    require_binaries(DAEMONS + CLIENTS, INSTALL_HINT)
    root = tmp_path_factory.mktemp(f"slurm{count}n")
    t0 = time.perf_counter()
    net = start_network(root / "net", count)
    try:
        cluster = start_slurm_nodes(root, net, partition)
    except BaseException:
        stop_network(net)
        raise
    print(
        f"\n{fixture}: started in {time.perf_counter() - t0:.1f} s under {root} on bridge {net.bridge}"
        f" {net.bridge_address} (pids {cluster.pids})"
    )
    try:
        yield cluster
    finally:
        t0 = time.perf_counter()
        try:
            stop_slurm(cluster)
        finally:
            stop_network(net)
        running = {name: p.pid for name, p in cluster.procs.items() if p.poll() is None}
        assert not running, f"{fixture} left daemons running: {running}"
        print(f"\n{fixture}: stopped in {time.perf_counter() - t0:.1f} s")
        shutil.rmtree(root / "db", ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmNodes]:
    """A private two-node Slurm with accounting for the whole test session; SLURM_CONF is left alone."""
    yield from running_slurm_nodes(tmp_path_factory, 2, PARTITION, "slurm_two_nodes")


@pytest.fixture(scope="module")
def slurm_four_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmNodes]:
    """A private four-node Slurm with accounting for one test module (partition "four"); SLURM_CONF is left alone."""
    yield from running_slurm_nodes(tmp_path_factory, 4, FOUR, "slurm_four_nodes")
