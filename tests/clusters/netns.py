"""Several "hosts" on one machine, as root: network namespaces n1, n2, ... on a private bridge with no uplink.

Each node is a veth pair whose bridge end stays in the root namespace and whose other end is `eth0` inside the
node's namespace (the same name on every node, so GLOO_SOCKET_IFNAME=eth0 works). The bridge holds `.1` of a
private /24 that no interface of the machine uses, n1 is `.11`, n2 is `.12`, and so on (two nodes unless asked for
more, at most nine). A command runs "on" a node through `NodeNetwork.wrap`: the node's network namespace (entered
with nsenter: `ip netns exec` remounts /sys and hides the cgroup mounts), its own UTS namespace with the node's
hostname, and its own mount namespace with a private hosts file and resolv.conf bind-mounted over the machine's
(which are never touched). Names carry a random suffix, so two test sessions on the machine never collide;
`stop_network` asserts that nothing of the network is left.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import random
import secrets
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.clusters import require_binaries, require_root, unavailable

BINARIES = ("ip", "nsenter", "unshare", "mount", "hostname")
INSTALL_HINT = ".ci/install_clusters.sh (apt-get install iproute2 util-linux mount hostname)"
# Serialises the choice of a free subnet between test sessions of this machine.
SUBNET_LOCK = Path("/tmp/extrema-netns.lock")
MAX_NODES = 9
STOP_TIMEOUT_S = 15.0
IP_TIMEOUT_S = 30.0
# Binds the hosts file ($1) and resolv.conf ($2), sets the hostname ($3), then runs the rest of the arguments.
ENTER = 'mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/resolv.conf && hostname "$3" && shift 3 && exec "$@"'
# The machine's name server is out of reach from the nodes: every lookup that misses the hosts file (a reverse
# lookup by torch's c10d, for one) would wait for its timeouts. Nothing listens on a node's 127.0.0.1:53.
RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


@dataclass
class Node:
    """One "host": its hostname, its address on the bridge, its network namespace and the bridge end of its veth."""

    name: str
    address: str
    netns: str
    host_veth: str

    @property
    def netns_path(self) -> Path:
        """The bind mount that names the namespace."""
        return Path("/run/netns") / self.netns


@dataclass
class NodeNetwork:
    """A running network of nodes: its directory, bridge, nodes (n1, n2, ... in order) and hosts file."""

    root: Path
    bridge: str
    bridge_address: str
    nodes: dict[str, Node]
    hosts_file: Path

    @property
    def resolv_conf(self) -> Path:
        """The resolv.conf of the nodes and `ctl`, beside the hosts file."""
        return self.hosts_file.with_name("resolv.conf")

    def wrap(self, node_name: str, argv: Sequence[str]) -> list[str]:
        """argv that runs the command on the node (its network, hostname and hosts file)."""
        node = self.nodes[node_name]
        return ["nsenter", f"--net={node.netns_path}", *self._enter(node.name, argv)]

    def wrap_ctl(self, argv: Sequence[str]) -> list[str]:
        """argv that runs the command as host `ctl`: the root network namespace, where the bridge address lives."""
        return self._enter("ctl", argv)

    def _enter(self, hostname: str, argv: Sequence[str]) -> list[str]:
        resolv = str(self.resolv_conf)
        return ["unshare", "--uts", "--mount", "sh", "-c", ENTER, "sh", str(self.hosts_file), resolv, hostname, *argv]

    def cut(self, node_name: str) -> None:
        """Take the node's link down: it can no longer reach the other nodes nor `ctl`."""
        ip("link", "set", self.nodes[node_name].host_veth, "down")

    def restore(self, node_name: str) -> None:
        """Bring the node's link up again."""
        ip("link", "set", self.nodes[node_name].host_veth, "up")

    def pids(self, node_name: str) -> list[int]:
        """Every process in the node's network namespace."""
        node = self.nodes[node_name]
        try:
            return pids_in(os.stat(node.netns_path).st_ino)
        except FileNotFoundError:
            return []

    def kill_node(self, node_name: str) -> list[int]:
        """SIGKILL every process of the node ("the node dies"); the PIDs killed."""
        killed: list[int] = []
        deadline = time.monotonic() + STOP_TIMEOUT_S
        # Repeat: a process may fork between the scan and the kill.
        while (pids := self.pids(node_name)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed += [p for p in pids if p not in killed]
            time.sleep(0.05)
        return killed


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip` with the arguments; RuntimeError with its stderr when it fails and `check`."""
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed: {out.stderr.strip()}")
    return out


def pids_in(netns_inode: int) -> list[int]:
    """Every process whose network namespace has this inode."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == netns_inode:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def used_networks() -> list[ipaddress.IPv4Network]:
    """The networks of every IPv4 address and route of the root namespace (the default route left out)."""
    nets = []
    for line in ip("-o", "-4", "addr", "show").stdout.splitlines() + ip("-4", "route").stdout.splitlines():
        for word in line.split():
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.IPv4Network(word, strict=False))
    return nets


def free_subnet() -> str:
    """A 10.77.X.0/24 that no address or route of this machine overlaps, as "10.77.X"."""
    used = used_networks()
    free = [x for x in range(256) if not any(ipaddress.IPv4Network(f"10.77.{x}.0/24").overlaps(n) for n in used)]
    if not free:
        raise RuntimeError("no free 10.77.X.0/24 subnet on this machine")
    return f"10.77.{random.choice(free)}"


def require_network() -> None:
    """Root, the binaries, and the right to create network namespaces, else fail/skip."""
    require_root("the network of nodes")
    require_binaries(BINARIES, INSTALL_HINT)
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        unavailable(f"cannot create network namespaces here: {probe.stderr.strip()}")


def start_network(root: Path, count: int = 2) -> NodeNetwork:
    """Create the bridge, `count` node namespaces (n1 .. n<count>) and the hosts file under `root`."""
    if not 1 <= count <= MAX_NODES:
        raise ValueError(f"a network of 1 to {MAX_NODES} nodes, not {count}")
    suffix = secrets.token_hex(3)
    root.mkdir(parents=True, exist_ok=True)
    net = NodeNetwork(root, f"xbr{suffix}", "", {}, root / "hosts")
    try:
        with open(SUBNET_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            base = free_subnet()
            net.bridge_address = f"{base}.1"
            ip("link", "add", net.bridge, "type", "bridge")
            ip("addr", "add", f"{net.bridge_address}/24", "dev", net.bridge)
            ip("link", "set", net.bridge, "up")
        for i in range(1, count + 1):
            name = f"n{i}"
            node = Node(name, f"{base}.1{i}", f"x{suffix}{name}", f"x{suffix}v{i}")
            net.nodes[name] = node
            peer = f"x{suffix}p{i}"
            ip("netns", "add", node.netns)
            ip("link", "add", node.host_veth, "type", "veth", "peer", "name", peer)
            ip("link", "set", node.host_veth, "master", net.bridge)
            ip("link", "set", node.host_veth, "up")
            ip("link", "set", peer, "netns", node.netns)
            ip("-n", node.netns, "link", "set", peer, "name", "eth0")
            ip("-n", node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
            ip("-n", node.netns, "link", "set", "eth0", "up")
            ip("-n", node.netns, "link", "set", "lo", "up")
            ip("-n", node.netns, "route", "add", "default", "via", net.bridge_address)
        named = {"ctl": net.bridge_address, **{n.name: n.address for n in net.nodes.values()}}
        hosts = ["127.0.0.1 localhost", "::1 localhost"] + [f"{a} {n}" for n, a in named.items()]
        net.hosts_file.write_text("\n".join(hosts) + "\n")
        net.resolv_conf.write_text(RESOLV_CONF)
    except BaseException:
        stop_network(net)
        raise
    return net


def leftovers(net: NodeNetwork, inodes: dict[str, int]) -> list[str]:
    """What of the network still exists: namespaces, links, processes in its namespaces, hosts-file mounts."""
    left = []
    listed = ip("netns", "list").stdout
    links = {line.split()[0].split("@")[0] for line in ip("-br", "link").stdout.splitlines() if line.strip()}
    for node in net.nodes.values():
        if node.netns in listed or node.netns_path.exists():
            left.append(f"netns {node.netns}")
        if node.host_veth in links:
            left.append(f"veth {node.host_veth}")
        if node.name in inodes and (pids := pids_in(inodes[node.name])):
            left.append(f"processes {pids} in {node.netns}")
    if net.bridge in links:
        left.append(f"bridge {net.bridge}")
    mounts = Path("/proc/self/mountinfo").read_text()
    left += [f"mount of {f}" for f in (net.hosts_file, net.resolv_conf) if str(f) in mounts]
    return left


def stop_network(net: NodeNetwork) -> None:
    """Kill what runs in the node namespaces, delete them, the veths and the bridge; AssertionError if any is left."""
    inodes = {}
    for name, node in net.nodes.items():
        with contextlib.suppress(FileNotFoundError):
            inodes[name] = os.stat(node.netns_path).st_ino
        net.kill_node(name)
    for node in net.nodes.values():
        ip("link", "del", node.host_veth, check=False)
        ip("netns", "del", node.netns, check=False)
    ip("link", "del", net.bridge, check=False)
    # `ip netns del` releases the veths asynchronously.
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (left := leftovers(net, inodes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"the network of nodes left {', '.join(left)}"
