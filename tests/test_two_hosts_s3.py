"""Whole sweeps from two "hosts" on one object-store root: `extrema-launch sweep` (local backend) runs in network
namespaces n1 and n2 (`tests.clusters.netns`, each with its own hostname, home and code cache) against one moto S3
server on the bridge, reached over HTTP like a real endpoint.

- Two sweeps of one file started at the same moment from n1 and n2: every stage completes, trained by one attempt.
- A driver killed with -9 on n1 while its pretraining runs there; a sweep of the same file from n2 follows
  (`adopt`) the stage n1 still trains; then n1 dies whole (every process of its namespace killed) and n2's attempt
  takes the stage over once the lease expires and resumes it from the DCP checkpoint on S3, to the same losses
  and weights as an uninterrupted run.
- The code snapshot on the root is imported, verified, by the stage processes of both hosts.

Each host has its own copy of the project's source (the working tree's packages, copied once, as a second checkout
would be), so both take the same snapshot and edits made to the working tree meanwhile change nothing here.

Needs root and network namespaces (skipped without them, failed under CI=true)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from s3fs import S3FileSystem

from extrema.run import code_snapshot, contract, lease, metrics_log, rundir
from launch.runstore import snapshot, store
from launch.sweepfile.expand import load_runs
from tests.clusters.netns import NodeNetwork, require_network, start_network, stop_network
from tests.s3server import KEY, REPO, SECRET, S3Server, running_server

BUCKET = "two-hosts"
HOSTS = ("n1", "n2")
TTL_S = 10.0  # short, so that n2 takes over a dead n1's stage within seconds (not so short a busy CPU starves it)
STEPS, CKPT_EVERY = 24, 4  # long enough to catch the pretraining running past its first checkpoint


@dataclass
class Hosts:
    """The network, the S3 server, and per host: its copy of the source and its environment."""

    net: NodeNetwork
    server: S3Server
    root: Path
    src: dict[str, Path]
    env: dict[str, dict[str, str]]

    def cache(self, host: str) -> Path:
        """Where the host's stage processes keep verified copies of snapshots fetched from the store."""
        return Path(self.env[host]["EXTREMA_CODE_CACHE"])


def copy_source(into: Path) -> None:
    """The working tree's packages (tracked and untracked-not-ignored files, as a snapshot takes them) into `into`."""
    for rel in snapshot.checkout_files(REPO) or snapshot.installed_files(REPO):
        (into / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, into / rel)


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    """Two hosts and a moto server (one request at a time, as S3 decides conditional writes) on the bridge."""
    require_network()
    root = tmp_path_factory.mktemp("s3two")
    first = root / "n1" / "src"
    copy_source(first)
    src = {"n1": first, "n2": root / "n2" / "src"}
    shutil.copytree(first, src["n2"])
    net = start_network(root / "net")
    try:
        with running_server(root / "moto.log", serial=True, host=net.bridge_address) as server:
            server.make_bucket(BUCKET)
            aws = {
                "AWS_ENDPOINT_URL": server.endpoint,
                "AWS_ACCESS_KEY_ID": KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true",
            }
            base = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "EXTREMA_", "PYTHONPATH"))}
            env = {}
            for h in HOSTS:
                home = root / h / "home"
                (home / "tmp").mkdir(parents=True)
                env[h] = {
                    **base,
                    **aws,
                    "HOME": str(home),
                    "TMPDIR": str(home / "tmp"),
                    "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-credentials"),
                    "AWS_CONFIG_FILE": str(home / "no-config"),
                    "EXTREMA_CODE_CACHE": str(home / ".cache" / "extrema" / "code"),
                    "EXTREMA_LEASE_TTL_S": str(TTL_S),
                    "EXTREMA_LEASE_HEARTBEAT_S": "0.5",
                    "OMP_NUM_THREADS": "1",
                }
            with pytest.MonkeyPatch.context() as mp:  # this process reads the store as a third host would
                for var in [v for v in os.environ if v.startswith("AWS_")]:
                    mp.delenv(var)
                for k, v in {**aws, **{k: v for k, v in env["n1"].items() if k.startswith("AWS_")}}.items():
                    mp.setenv(k, v)
                mp.setenv("EXTREMA_LEASE_TTL_S", str(TTL_S))
                S3FileSystem.clear_instance_cache()  # an instance cached by an earlier module keeps its old endpoint
                yield Hosts(net, server, root, src, env)
            S3FileSystem.clear_instance_cache()
    finally:
        stop_network(net)


def sweep_file(path: Path, root: str, designs: list[str]) -> Path:
    """tiny.yaml on `root`, one run per class-token design, pretraining STEPS steps with a checkpoint every
    CKPT_EVERY."""
    doc = yaml.safe_load((REPO / "jobs" / "tiny.yaml").read_text())
    doc["root"] = root
    doc["sweep"] = {"grid": {"model.cls_token": designs}}
    doc["base"]["pretrain"].update(steps=STEPS, ckpt_every=CKPT_EVERY)
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class Driver:
    """`python -m launch.cli sweep FILE` on one host: its process (own session, as a terminal starts it) and log."""

    host: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float) -> str:
        self.proc.wait(timeout=timeout)
        return self.output()


def sweep_on(hosts: Hosts, host: str, path: Path, name: str) -> Driver:
    """Start `sweep` of `path` on `host`, from the host's own copy of the source."""
    log = path.parent / f"{name}.log"
    argv = hosts.net.wrap(host, [sys.executable, "-m", "launch.cli", "sweep", str(path), "--progress-every", "5"])
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=hosts.src[host], env=hosts.env[host], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Driver(host, proc, log)


@contextlib.contextmanager
def reaped(*drivers: Driver) -> Iterator[None]:
    """Kill (by process group) any driver still running when the block ends."""
    try:
        yield
    finally:
        for d in drivers:
            if d.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(d.proc.pid, signal.SIGKILL)
                d.proc.wait(timeout=30)


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (got := check()):
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f} s waiting for {what}"
        time.sleep(0.3)
    return got


def stages_of(sweep: str) -> dict[str, str]:
    """'run/stage' -> stage URL of every stage the manifest lists."""
    manifest = store.read_manifest(sweep)
    assert manifest is not None
    return {f"{r['run_id']}/{s}": store.stage_url(sweep, r["run_id"], s) for r in manifest["runs"] for s in r["stages"]}


def lease_records(stage: str) -> dict[int, dict[str, Any]]:
    return {g: lease.read_holder(stage, g).record for g in lease.generations(stage)}


def attempt_logs(stage: str) -> dict[str, str]:
    """Each attempt log of the stage: name -> text."""
    fs, path = rundir.filesystem(contract.StageDir(stage).logs)
    return {p.rsplit("/", 1)[-1]: fs.cat_file(p).decode(errors="replace") for p in sorted(fs.ls(path, detail=False))}


def steps_logged(stage: str) -> list[tuple[int, float]]:
    """(step, loss) of every training record of the stage's metrics log, in order."""
    return [(r["step"], r["loss"]) for r in metrics_log.read_records(contract.StageDir(stage).metrics) if "loss" in r]


def trained(log: str) -> bool:
    """Whether an attempt's log shows it training (not an attempt that found the stage completed)."""
    return "was completed by an earlier attempt" not in log and "Traceback" not in log


def show(key: str, status: dict[str, Any], leases: dict[int, dict[str, Any]]) -> str:
    owners = ", ".join(f"gen {g} {r.get('host')} pid {r.get('pid')} ({r.get('released')})" for g, r in leases.items())
    return f"{key}: {status['state']} on {status.get('host')}, attempts {status.get('attempts')}, leases: {owners}"


@pytest.fixture(scope="module")
def together(hosts: Hosts) -> tuple[str, list[Driver], float]:
    """Two sweeps of one file started at the same moment from n1 and n2 on one s3:// root: the sweep's URL, the
    drivers (ended) and the seconds they took."""
    root = f"s3://{BUCKET}/{uuid.uuid4().hex}/runs"
    path = sweep_file(hosts.root / "together.yaml", root, ["cait", "avgpool"])
    t0 = time.monotonic()
    drivers = [sweep_on(hosts, h, path, f"together-{h}") for h in HOSTS]
    with reaped(*drivers):
        for d in drivers:
            d.wait(400)
    return store.sweep_url(root, "tiny"), drivers, time.monotonic() - t0


def test_two_sweeps_started_together_from_two_hosts_run_every_stage_once(
    together: tuple[str, list[Driver], float],
) -> None:
    url, drivers, took = together
    if [d.proc.returncode for d in drivers] != [0, 0]:  # each driver's whole output: pytest would cut its middle
        pytest.fail("\n".join(f"--- {d.host}: exit {d.proc.returncode}\n{d.output()}" for d in drivers), pytrace=False)
    stages = stages_of(url)
    assert len(stages) == 4
    for key, stage in stages.items():
        status = store.read_status(stage)
        leases = lease_records(stage)
        print(show(key, status, leases))
        assert status["state"] == "completed" and status["attempts"] == 1, (key, status)
        assert status["host"] in HOSTS and status["code"], (key, status)
        # The attempt that trained holds the generation the status names; any other attempt found it completed.
        owner = leases[status["lease_generation"]]
        assert owner["host"] == status["host"] and owner["attempt"] == status["lease_generation"]
        logs = attempt_logs(stage)
        training = [n for n, text in logs.items() if trained(text)]
        assert len(training) == 1 and f"on {status['host']}:" in logs[training[0]], (key, logs)
        if key.endswith("/pretrain"):
            steps = [s for s, _ in steps_logged(stage)]
            assert steps == list(range(1, STEPS + 1)), (key, steps)  # every step logged once
    hosts_used = {store.read_status(s)["host"] for s in stages.values()}
    print(f"two sweeps from n1 and n2: {took:.0f} s; stages ran on {sorted(hosts_used)}")
    codes = {store.read_status(s)["code"] for s in stages.values()}
    assert len(codes) == 1  # both hosts' checkouts are the same code: one snapshot on the root


def test_a_driver_killed_on_one_host_is_adopted_then_resumed_from_s3_on_the_other(
    hosts: Hosts, together: tuple[str, list[Driver], float]
) -> None:
    from extrema.train import ckpt

    sweep = f"s3://{BUCKET}/{uuid.uuid4().hex}/runs"
    path = sweep_file(hosts.root / "killed.yaml", sweep, ["cait"])
    url = store.sweep_url(sweep, "tiny")
    (run,) = load_runs(path)[1]
    stage = store.stage_url(url, run.run_id, "pretrain")
    ref_stage = store.stage_url(together[0], run.run_id, "pretrain")  # the same run, uninterrupted, from test 1
    assert store.read_status(ref_stage)["state"] == "completed"
    ckpts = contract.StageDir(stage).checkpoints
    t0 = time.monotonic()
    first = sweep_on(hosts, "n1", path, "killed-n1")
    with reaped(first):
        wait_for(lambda: ckpt.latest_step(ckpts), 180, "n1's pretraining to save a checkpoint on S3")
        owner = lease.live_holder(stage)
        assert owner is not None and owner.host == "n1", owner
        trainer_env = dict(
            kv.split("=", 1) for kv in Path(f"/proc/{owner.pid}/environ").read_text().split("\0") if "=" in kv
        )
        # A user's `kill -9` of the driver (here its whole process group, as a terminal's job control sends it):
        # the stage process runs in its own session and goes on training on n1.
        os.killpg(first.proc.pid, signal.SIGKILL)
        first.proc.wait(timeout=30)
    t_driver_killed = time.monotonic() - t0
    step_at_kill = ckpt.latest_step(ckpts)
    os.kill(owner.pid, 0)  # the trainer outlived its driver
    assert lease.live_holder(stage) is not None

    second = sweep_on(hosts, "n2", path, "killed-n2")
    with reaped(second):
        plan = wait_for(lambda: "adopt" in second.output() and second.output(), 120, "n2's plan")
        assert store.read_status(stage)["state"] != "completed", "n1 finished before n2 planned: no takeover to test"
        t_adopted = time.monotonic() - t0
        killed = hosts.net.kill_node("n1")  # now n1 dies whole: its trainer with it
        t_n1_dead = time.monotonic() - t0
        step_n1_died = ckpt.latest_step(ckpts)
        out = second.wait(400)
    t_done = time.monotonic() - t0
    assert second.proc.returncode == 0, out
    assert owner.pid in killed
    status = store.read_status(stage)
    leases = lease_records(stage)
    print(show("killed/pretrain", status, leases), plan.splitlines()[:12])
    # Resumed once on n2, from the checkpoint n1 wrote on S3: attempt 2, lease generation 2, host n2.
    assert status["state"] == "completed" and status["attempts"] == 2 and status["host"] == "n2", status
    assert leases[1]["host"] == "n1" and leases[1].get("taken_over_by") == 2, leases
    assert leases[2]["host"] == "n2" and leases[2]["outcome"] == "completed", leases
    logs = attempt_logs(stage)
    assert any("on n2:" in text for text in logs.values()), logs
    steps = [s for s, _ in steps_logged(stage)]
    assert steps == list(range(1, STEPS + 1)), steps  # the steps n1 logged past its checkpoint were cut, not doubled
    # The knn that n1's dead sweep had queued is followed from n2 too (not left `pending` forever), and runs once.
    rows = {line.split("│")[2].strip(): line for line in plan.splitlines() if line.count("│") > 3}
    assert "adopt: follow the running attempt" in rows["pretrain"], plan
    assert "adopt: follow the attempt another host's sweep queued" in rows["knn"], plan
    knn = store.read_status(store.stage_url(url, run.run_id, "knn"))
    assert knn["state"] == "completed" and knn["attempts"] == 1 and knn["host"] == "n2", knn

    # The same run uninterrupted (test 1's, same run id): the same loss at every step and the same final weights.
    assert steps_logged(stage) == steps_logged(ref_stage)
    resumed, plain = weights(stage), weights(ref_stage)
    assert resumed.keys() == plain.keys() and all(torch.equal(resumed[k], plain[k]) for k in resumed)

    # The code: both hosts' stage processes imported the snapshot on the root, from a verified local copy.
    code_id = status["code"]
    assert code_snapshot.read_manifest(rundir.join(url, "code", code_id, code_snapshot.MANIFEST))["id"] == code_id
    for host in HOSTS:
        copy = hosts.cache(host) / code_id / code_snapshot.FILES
        code_snapshot.verify(copy)
    assert trainer_env["PYTHONPATH"].split(os.pathsep)[0] == str(hosts.cache("n1") / code_id / code_snapshot.FILES)
    prov = contract.read_record(contract.StageDir(stage).provenance)
    assert prov is not None and prov["host"] == "n2" and prov["code"] == code_id, prov
    assert prov["code_path"].startswith(str(hosts.cache("n2") / code_id)), prov
    print(
        f"n1 checkpoint step {step_at_kill}: driver killed at {t_driver_killed:.0f} s; n2 planned adopt at "
        f"{t_adopted:.0f} s; n1 killed at {t_n1_dead:.0f} s (checkpoint step {step_n1_died}); n2 done at "
        f"{t_done:.0f} s"
    )


def weights(stage: str) -> dict[str, Any]:
    """Every parameter of the stage's newest checkpoint on S3, loaded in this process."""
    from extrema.models.extrema import ExtreMA
    from extrema.spec import RunSpec
    from extrema.train import ckpt

    spec = RunSpec.model_validate(contract.read_record(contract.StageDir(stage).spec))
    model = ExtreMA(spec.experiment.model)
    ckpts = contract.StageDir(stage).checkpoints
    rundir.filesystem(ckpts)[0].invalidate_cache()  # this process listed the steps while they were being written
    ckpt.load_module(ckpt.step_url(ckpts, ckpt.latest_step(ckpts)), model, prefix="")
    return model.state_dict()
