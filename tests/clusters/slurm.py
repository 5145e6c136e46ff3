"""A private single-node Slurm 22.05 with accounting: munge, MariaDB, slurmdbd, slurmctld and slurmd, as root.

Everything (config, state, spool, logs, the munge key and socket, the database) lives under one temporary
directory; the daemons run in the foreground as children of the test process, listen on free non-default ports,
and are stopped by PID in the order slurmd, slurmctld, slurmdbd, mariadbd, munged. Every client call is bounded
by a timeout, since Slurm clients hang for tens of seconds when slurmctld is down. The conf writer and the start
of munge, MariaDB, slurmdbd and slurmctld are shared with `tests.clusters.slurm_nodes`.

    pytest -m slurm          # fixture `slurm_cluster`; sets SLURM_CONF for the test session
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.clusters import free_ports, port_open, require_binaries, require_root, wait_until

DAEMONS = ("munged", "mariadb-install-db", "mariadbd", "mariadb", "slurmdbd", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sacct", "sacctmgr", "scontrol", "scancel", "sinfo")
INSTALL_HINT = ".ci/install_clusters.sh (apt-get install slurmctld slurmd slurm-client munge slurmdbd mariadb-server)"
CLUSTER_NAME = "extrematest"
PARTITION = "debug"
# Small on purpose, so that tests exercise the chunking of job arrays on a real controller.
MAX_ARRAY_SIZE = 2
CLIENT_TIMEOUT_S = 30.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
DB_USER, DB_PASS = "slurm", "slurmpw"


@dataclass
class SlurmCluster:
    """A running private cluster: where it lives, how to reach it, and its daemons in start order."""

    root: Path
    ports: dict[str, int]
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    partition: str = PARTITION
    max_array_size: int = MAX_ARRAY_SIZE
    cluster_name: str = CLUSTER_NAME

    @property
    def conf(self) -> Path:
        """The slurm.conf clients must read (exported as SLURM_CONF)."""
        return self.root / "etc" / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        """The private munge socket."""
        return self.root / "munge" / "munge.socket.2"

    @property
    def env(self) -> dict[str, str]:
        """The environment for daemons and clients of this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @property
    def pids(self) -> dict[str, int]:
        """Daemon name -> PID."""
        return {name: p.pid for name, p in self.procs.items()}

    def run(
        self, *args: str, timeout: float = CLIENT_TIMEOUT_S, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command against this cluster, bounded by a timeout."""
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout, check=check)

    def log(self, daemon: str) -> str:
        """The log file of a daemon, for failure messages."""
        path = self.root / "log" / f"{daemon}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def slurm_conf(
    c: SlurmCluster,
    nodes: Mapping[str, str],
    cpus: int,
    memory_mb: int,
    controller: str = "localhost",
    slurmd_timeout: int = 30,
) -> str:
    """slurm.conf of the private cluster (accounting through slurmdbd); `nodes` maps node name -> address."""
    r = c.root
    # With several nodes, each slurmd gets its own spool dir, pid and log file (%n: the node name).
    node = ".%n" if len(nodes) > 1 else ""
    spool = f"{r}/spool/%n" if node else f"{r}/spool"
    node_lines = "".join(
        f"NodeName={name} NodeAddr={addr} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN\n"
        for name, addr in nodes.items()
    )
    names = ",".join(nodes)
    return f"""\
ClusterName={c.cluster_name}
SlurmctldHost={controller}
SlurmctldPort={c.ports["slurmctld"]}
SlurmdPort={c.ports["slurmd"]}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={c.munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={spool}
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd{node}.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd{node}.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={c.ports["slurmdbd"]}
AccountingStoragePass={c.munge_socket}
JobCompType=jobcomp/none
SlurmdTimeout={slurmd_timeout}
InactiveLimit=0
KillWait=5
MinJobAge=300
MaxArraySize={c.max_array_size}
{node_lines}PartitionName={c.partition} Nodes={names} Default=YES MaxTime=INFINITE State=UP
"""


def slurmdbd_conf(c: SlurmCluster) -> str:
    """slurmdbd.conf: the accounting daemon and its private MariaDB."""
    return f"""\
AuthType=auth/munge
AuthInfo=socket={c.munge_socket}
DbdHost=localhost
DbdPort={c.ports["slurmdbd"]}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={c.ports["mariadb"]}
StorageUser={DB_USER}
StoragePass={DB_PASS}
StorageLoc=slurm_acct_db
PidFile={c.root}/run/slurmdbd.pid
LogFile={c.root}/log/slurmdbd.log
"""


def memory_mb() -> int:
    """Most of this machine's memory, in MB, for the node definition."""
    with open("/proc/meminfo") as f:
        total_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    return int(total_kb / 1024 * 0.9)


def spawn(c: SlurmCluster, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start one daemon in the foreground, in its own session, with output into <root>/log/<name>.out."""
    out = open(c.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 -- the child keeps it open
    try:
        proc = subprocess.Popen(
            argv, env=c.env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    finally:
        out.close()
    c.procs[name] = proc
    return proc


def alive(c: SlurmCluster, name: str) -> bool:
    """The daemon is still running; RuntimeError with its log tail when it has died."""
    code = c.procs[name].poll()
    if code is not None:
        tail = (c.log(name) or (c.root / "log" / f"{name}.out").read_text(errors="replace"))[-3000:]
        raise RuntimeError(f"{name} exited with {code} while starting:\n{tail}")
    return True


def mariadb_ready(c: SlurmCluster) -> bool:
    """MariaDB answers on its socket."""
    if not alive(c, "mariadbd") or not (c.root / "db" / "mysqld.sock").exists():
        return False
    q = subprocess.run(
        ["mariadb", "--no-defaults", "-S", str(c.root / "db" / "mysqld.sock"), "-uroot", "-e", "SELECT 1"],
        capture_output=True,
        timeout=CLIENT_TIMEOUT_S,
    )
    return q.returncode == 0


def node_idle(c: SlurmCluster) -> bool:
    """slurmd has registered and the node accepts jobs."""
    alive(c, "slurmd")
    out = c.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10).stdout.strip()
    return out.startswith("idle")


def cluster_ports() -> dict[str, int]:
    """Free ports for slurmctld, slurmd, slurmdbd and MariaDB."""
    names = ("slurmctld", "slurmd", "slurmdbd", "mariadb")
    return dict(zip(names, free_ports(len(names))))


def write_confs(c: SlurmCluster, slurm_conf_text: str) -> None:
    """Create the cluster's directories and write slurm.conf and slurmdbd.conf."""
    for sub in ("etc", "munge", "state", "spool", "log", "run", "db"):
        (c.root / sub).mkdir(parents=True, exist_ok=True)
    c.conf.write_text(slurm_conf_text)
    (c.root / "etc" / "slurmdbd.conf").write_text(slurmdbd_conf(c))
    (c.root / "etc" / "slurmdbd.conf").chmod(0o600)


def start_accounting(c: SlurmCluster) -> None:
    """Start munged, a private MariaDB and slurmdbd, and register the cluster with the accounting."""
    root = c.root
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    (root / "munge").chmod(0o700)
    spawn(c, "munged", ["munged", "--foreground", "--force", f"--socket={c.munge_socket}", f"--key-file={key}",
                        f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
                        f"--seed-file={root}/munge/munged.seed"])  # fmt: skip
    c.run("mariadb-install-db", "--no-defaults", "--user=root", f"--datadir={root}/db/data",
          "--auth-root-authentication-method=normal", "--skip-test-db", timeout=120)  # fmt: skip
    spawn(c, "mariadbd", ["mariadbd", "--no-defaults", "--user=root", f"--datadir={root}/db/data",
                          f"--socket={root}/db/mysqld.sock", f"--port={c.ports['mariadb']}",
                          "--bind-address=127.0.0.1", f"--pid-file={root}/run/mariadbd.pid",
                          f"--log-error={root}/log/mariadbd.log", "--innodb-buffer-pool-size=64M",
                          "--skip-name-resolve"])  # fmt: skip
    wait_until(lambda: alive(c, "munged") and c.munge_socket.exists(), START_TIMEOUT_S, "munged")
    wait_until(lambda: mariadb_ready(c), START_TIMEOUT_S, "mariadbd", interval_s=0.2)
    grant = (
        f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_PASS}';"
        f" GRANT ALL ON slurm_acct_db.* TO '{DB_USER}'@'127.0.0.1';"
    )
    c.run("mariadb", "--no-defaults", "-S", f"{root}/db/mysqld.sock", "-uroot", "-e", grant)
    spawn(c, "slurmdbd", ["slurmdbd", "-D"])
    wait_until(lambda: alive(c, "slurmdbd") and port_open(c.ports["slurmdbd"]), START_TIMEOUT_S, "slurmdbd")
    c.run("sacctmgr", "-i", "add", "cluster", c.cluster_name)


def start_slurmctld(c: SlurmCluster, argv: list[str]) -> None:
    """Start slurmctld with `argv` (`slurmctld -D -i`, possibly wrapped) and wait until it listens."""
    spawn(c, "slurmctld", argv)
    wait_until(lambda: alive(c, "slurmctld") and port_open(c.ports["slurmctld"]), START_TIMEOUT_S, "slurmctld")


def start_slurm(root: Path, max_array_size: int = MAX_ARRAY_SIZE) -> SlurmCluster:
    """Start munge, MariaDB, slurmdbd, slurmctld and slurmd under `root`; return once the node is idle."""
    c = SlurmCluster(root=root, ports=cluster_ports(), max_array_size=max_array_size)
    write_confs(c, slurm_conf(c, {"localhost": "127.0.0.1"}, os.cpu_count() or 1, memory_mb()))
    try:
        start_accounting(c)
        start_slurmctld(c, ["slurmctld", "-D", "-i"])
        spawn(c, "slurmd", ["slurmd", "-D", "-N", "localhost"])
        wait_until(lambda: node_idle(c), START_TIMEOUT_S, "slurmd to register an idle node", interval_s=0.2)
    except BaseException:
        stop_slurm(c)
        raise
    return c


def cancel_all_jobs(c: SlurmCluster) -> None:
    """Cancel every job of the private cluster and wait (bounded) until none is left running."""
    if "slurmctld" not in c.procs or c.procs["slurmctld"].poll() is not None:
        return
    try:
        c.run("scancel", "--full", f"--user={os.getuid()}", check=False)
        wait_until(lambda: not c.run("squeue", "-h", "-t", "R,CG", check=False).stdout.strip(), 20, "jobs to end", 0.5)
    except (subprocess.TimeoutExpired, TimeoutError):
        pass


def stop_slurm(c: SlurmCluster) -> None:
    """Cancel what is left, then TERM each daemon by PID in reverse start order: slurmd(s), slurmctld, slurmdbd,
    mariadbd, munged."""
    cancel_all_jobs(c)
    for proc in reversed(list(c.procs.values())):
        if proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A private Slurm with accounting for the whole test session; SLURM_CONF points at it meanwhile."""
    require_root("the private Slurm")
    require_binaries(DAEMONS + CLIENTS, INSTALL_HINT)
    root = tmp_path_factory.mktemp("slurm")
    t0 = time.perf_counter()
    cluster = start_slurm(root)
    print(f"\nslurm_cluster: started in {time.perf_counter() - t0:.1f} s under {root} (pids {cluster.pids})")
    mp = pytest.MonkeyPatch()
    mp.setenv("SLURM_CONF", str(cluster.conf))
    try:
        yield cluster
    finally:
        mp.undo()
        t0 = time.perf_counter()
        stop_slurm(cluster)
        print(f"\nslurm_cluster: stopped in {time.perf_counter() - t0:.1f} s")
        shutil.rmtree(root / "db", ignore_errors=True)
