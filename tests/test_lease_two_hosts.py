"""The stage lease raced from two "hosts": processes in network namespaces n1 and n2 (`tests.clusters.netns`, each
with its own hostname) reach one S3 server (moto) on the bridge over HTTP. Of four racers exactly one wins; frozen
past the TTL, it is taken over by exactly one of the three others and, continued, fails its fence with LeaseLost.

Needs root and network namespaces (skipped without them, failed under CI=true)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.clusters.netns import NodeNetwork, require_network, start_network, stop_network
from tests.s3server import KEY, REPO, SECRET, S3Server, running_server

BUCKET = "leases"
TTL_S = 2.0
# Says it is ready; at the go file, takes the stage if it can and says so; a loser tries again at the `later` file.
# A winner heartbeats until the stop file, then fences.
RACER = """
import json, os, socket, sys, time
from extrema.run import lease
stage, go, later, stop = sys.argv[1:5]

def take(at):
    lease.generations(stage)  # the client is made and connected: the race is not spread by start-up costs
    print(json.dumps({"ready": True}), flush=True)
    while not os.path.exists(at):
        time.sleep(0.01)
    got = lease.try_acquire(stage)
    won = isinstance(got, lease.Lease)
    print(json.dumps({"host": socket.gethostname(), "won": won, "generation": got.generation}), flush=True)
    return got

got = take(go)
if not isinstance(got, lease.Lease):
    got = take(later)
if isinstance(got, lease.Lease):
    got.start_heartbeat()
    while not os.path.exists(stop):
        time.sleep(0.05)
    try:
        got.fence("result")
    except lease.LeaseLost as e:
        print(json.dumps({"lost": str(e)}), flush=True)
        sys.exit(4)
"""


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeNetwork, S3Server]]:
    """The two-node network and a moto server (one request at a time) on its bridge address."""
    require_network()
    root = tmp_path_factory.mktemp("lease2h")
    net = start_network(root / "net")
    try:
        with running_server(root / "moto.log", serial=True, host=net.bridge_address) as server:
            server.make_bucket(BUCKET)
            yield net, server
    finally:
        stop_network(net)


def racer(net: NodeNetwork, node: str, server: S3Server, args: list[str]) -> subprocess.Popen[str]:
    """A racer process on `node` (its stdout piped)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "EXTREMA_LEASE_TTL_S": str(TTL_S),
        "EXTREMA_LEASE_HEARTBEAT_S": "0.2",
    }
    argv = net.wrap(node, [sys.executable, "-c", RACER, *args])
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def answers(procs: list[subprocess.Popen[str]]) -> list[dict[str, object]]:
    """Each racer's next JSON line."""
    out = []
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("{"):
            raise AssertionError(f"racer {proc.pid} said {line!r} (exit {proc.poll()})")
        out.append(dict(json.loads(line)))
    return out


def test_one_winner_across_two_hosts_and_a_frozen_winner_is_taken_over_once_and_fenced(
    two_hosts: tuple[NodeNetwork, S3Server], tmp_path: Path
) -> None:
    net, server = two_hosts
    stage = f"s3://{BUCKET}/{uuid.uuid4().hex}/run/pretrain"
    go, later, stop = tmp_path / "go", tmp_path / "later", tmp_path / "stop"
    procs = [racer(net, node, server, [stage, str(go), str(later), str(stop)]) for node in ("n1", "n2") * 2]

    def kill_all() -> None:
        for p in procs:
            p.kill()

    watchdog = threading.Timer(60, kill_all)  # a racer that never answers fails the test
    watchdog.start()
    try:
        assert answers(procs) == [{"ready": True}] * len(procs)
        go.touch()
        first = answers(procs)
        assert {a["host"] for a in first} == {"n1", "n2"}
        assert [a["won"] for a in first].count(True) == 1 and {a["generation"] for a in first} == {1}, first
        winner = next(p for p, a in zip(procs, first, strict=True) if a["won"])
        others = [p for p in procs if p is not winner]
        assert answers(others) == [{"ready": True}] * len(others)

        winner.send_signal(signal.SIGSTOP)  # frozen, its heartbeat with it
        time.sleep(TTL_S + 0.5)
        later.touch()
        second = answers(others)
        assert [a["won"] for a in second].count(True) == 1 and {a["generation"] for a in second} == {2}, second
        stop.touch()
        winner.send_signal(signal.SIGCONT)
        assert winner.wait(timeout=30) == 4
        assert winner.stdout is not None and "taken over" in winner.stdout.read()
        assert [p.wait(timeout=30) for p in others] == [0] * len(others)
    finally:
        watchdog.cancel()
        stop.touch()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
    puts = server.requests("PUT", f"/{stage.removeprefix('s3://')}/")
    print(f"{len(puts)} PUTs ({puts.count(412)} refused) across two hosts")
