"""Slurm backend through submitit: the plans of `launch.backends.slurm.plan` sent as sbatch job arrays, their states
from sacct/squeue, cancel with scancel, and `StageCall`, what every task runs.

Every task runs `StageCall(run_dir, stage)`, which calls `extrema.entry.main([run_dir, stage])`. On preemption or
timeout (SIGUSR2, sent `signal_delay_s` before the time limit) submitit calls `StageCall.checkpoint()`, which
requeues the same call: training state lives in the run store, and the stage resumes from its latest complete
checkpoint. A stage that catches the signal itself saves a checkpoint and exits with 3; the signal is then handed
back to submitit, which requeues. Ranks of a multi-task stage get MASTER_ADDR/PORT, RANK, WORLD_SIZE and
LOCAL_RANK from submitit's job environment. A downstream task whose dependency can never be satisfied (its
upstream failed) is reported CANCELLED. MaxArraySize is read once from `scontrol show config`. A stage whose
failures named nodes (`extrema.run.bad_nodes`) is sent with `--exclude` of them, as far as its partition (`sinfo`)
keeps enough nodes for it; a job Slurm ended NODE_FAIL names the nodes it marks down (`lost_nodes`).

The launcher's Slurm settings (`SlurmSettings`) shape every script: `max_parallel` is each array's `%n`, `max_requeues`
submitit's `max_num_timeout`, `setup` the lines before srun, and `container` / `python` what each task runs
(`launch.backends.slurm.plan`: pyxis on the srun line, or `apptainer exec`).
"""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment
from submitit.slurm.slurm import _make_sbatch_string, read_job_id

from extrema.run import bad_nodes, contract
from launch.backends.base import Backend, Job, LauncherSettings, RecordedJob, State
from launch.backends.container import ContainerSpec
from launch.backends.log_source import LogSource, file_source, rank_hosts
from launch.backends.slurm.logs import slurm_files, slurm_label, slurm_rank
from launch.backends.slurm.plan import (
    checked_ids,
    checked_nodes,
    code_setup,
    container_mounts,
    job_name,
    log_folder,
    parse_max_array_size,
    pyxis_args,
    sbatch_parameters,
    send_arrays,
    submitit_command,
    task_python,
    validate_resources,
)
from launch.backends.slurm.settings import SlurmSettings, setup_line_problem

CLIENT_TIMEOUT_S = 60.0
ARRAY_PARALLELISM = 256  # tasks of one array running at once (`%n`) unless launcher.max_parallel says otherwise
SLURM_STATES: dict[str, State] = {
    "PENDING": State.PENDING,
    "REQUEUED": State.PENDING,
    "REQUEUE_HOLD": State.PENDING,
    "REQUEUE_FED": State.PENDING,
    "RESV_DEL_HOLD": State.PENDING,
    "CONFIGURING": State.RUNNING,
    "RUNNING": State.RUNNING,
    "COMPLETING": State.RUNNING,
    "STAGE_OUT": State.RUNNING,
    "SIGNALING": State.RUNNING,
    "RESIZING": State.RUNNING,
    "STOPPED": State.RUNNING,
    "COMPLETED": State.COMPLETED,
    "FAILED": State.FAILED,
    "TIMEOUT": State.FAILED,
    "NODE_FAIL": State.FAILED,
    "OUT_OF_MEMORY": State.FAILED,
    "BOOT_FAIL": State.FAILED,
    "DEADLINE": State.FAILED,
    "SPECIAL_EXIT": State.FAILED,
    "CANCELLED": State.CANCELLED,
    "REVOKED": State.CANCELLED,
    "PREEMPTED": State.PREEMPTED,
    "SUSPENDED": State.PREEMPTED,
}


def parse_states(text: str) -> dict[str, tuple[str, str]]:
    """`JobID|State|Reason` lines (sacct -P / squeue) -> job id -> (state, reason), array ranges expanded."""
    out: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0] or "." in parts[0] or parts[0] == "JobID":
            continue
        state, reason = parts[1].split(" ")[0].upper(), parts[2] if len(parts) > 2 else ""
        for split in read_job_id(parts[0]):
            out["_".join(split[:2])] = (state, reason)
            if len(split) >= 3:
                for index in range(int(split[1]), int(split[2]) + 1):
                    out[f"{split[0]}_{index}"] = (state, reason)
    return out


def parse_partition_nodes(text: str, partition: str | None) -> list[str]:
    """The nodes of `partition` (the default one, marked `*`, when None) from `sinfo -h -N -o '%N|%P'` lines."""
    out = []
    for line in text.splitlines():
        node, _, part = line.strip().partition("|")
        if node and (part.rstrip("*") == partition if partition else part.endswith("*")):
            out.append(node)
    return list(dict.fromkeys(out))


def node_fails(text: str) -> dict[str, str]:
    """Job id -> node list of the incarnations that ended NODE_FAIL, from `JobID|State|NodeList` lines."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        for job_id, (state, nodes) in parse_states(line).items():
            if state == "NODE_FAIL":
                out[job_id] = nodes
    return out


def to_state(slurm_state: str, reason: str = "") -> State:
    """A Slurm job state (and pending reason) as a backend State."""
    if slurm_state == "PENDING" and reason == "DependencyNeverSatisfied":
        return State.CANCELLED
    return SLURM_STATES.get(slurm_state, State.UNKNOWN)


def job_running(job_id: str, timeout_s: float = CLIENT_TIMEOUT_S, tries: int = 5, pause_s: float = 2.0) -> bool:
    """Whether Slurm still has the job RUNNING (not cancelled, preempted or requeued by Slurm itself). A busy
    controller that does not answer is asked again; one that never answers counts as RUNNING (the job's own
    process is still running, and a requeue of an ended job is refused by Slurm, not done twice)."""
    for attempt in range(tries):
        try:
            out = subprocess.run(
                ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip() == "RUNNING"
        if attempt + 1 < tries:
            time.sleep(pause_s)
    return True


def requeue_after_preemption() -> None:
    """The stage caught SIGUSR2/SIGTERM and saved a checkpoint (exit 3): requeue through submitit.

    While the stage ran, its own handlers had replaced submitit's. When Slurm still has the job RUNNING (USR2 from
    `--signal` before the time limit, or from `scancel --signal=USR2`), the signal is raised again so that
    submitit's handler, restored by now, calls `StageCall.checkpoint()`, requeues the job and exits. A job that
    was cancelled (SIGTERM from scancel) or that Slurm requeues itself is left to Slurm. Only rank 0 requeues.
    """
    env = submitit.JobEnvironment()
    if env.global_rank != 0 or not job_running(env.job_id):
        return
    os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(60)  # submitit's handler requeues and exits the process from here


def resolve_ipv4(host: str) -> str | None:
    """The first IPv4 address a host name resolves to here (the node's own resolver), else None."""
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return None
    return str(infos[0][4][0]) if infos else None


def node_addr(node: str, timeout_s: float = CLIENT_TIMEOUT_S) -> str | None:
    """NodeAddr of a node as slurmctld knows it (`scontrol show node`), else None."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", "--", node], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    return m.group(1) if m and out.returncode == 0 else None


def rendezvous_address(first_node: str, num_nodes: int) -> str:
    """Where every rank meets rank 0: the address of the allocation's first node. Across nodes it is never a
    loopback address (the other nodes could not reach it): the node's resolved name, else slurmctld's NodeAddr,
    else a RuntimeError that says so."""
    resolved = resolve_ipv4(first_node)
    if num_nodes == 1:
        return resolved or first_node
    tried = [f"{first_node} resolves to {resolved or 'nothing'}"]
    for candidate in (resolved, node_addr(first_node)):
        address = candidate if candidate is None else resolve_ipv4(candidate)
        if address and not ipaddress.ip_address(address).is_loopback:
            return address
        if candidate is not resolved:
            tried.append(f"its NodeAddr is {candidate or 'unknown'}")
    raise RuntimeError(
        f"no rendezvous address reachable from other nodes for {first_node}: {'; '.join(tried)} "
        "(fix the node's name resolution or its NodeAddr)"
    )


def sbatch_script(params: Mapping[str, Any], folder: Path, tasks: int, python: str) -> str:
    """The sbatch script submitit writes for one array of `tasks` tasks (a plain job for one) with these
    `sbatch_parameters`, logs and pickles in `folder`; nothing is submitted, no cluster is needed."""
    count = tasks if tasks > 1 else None
    return str(_make_sbatch_string(command=submitit_command(python, folder), folder=folder, map_count=count, **params))


class StageCall(Checkpointable):
    """What a Slurm task runs: one stage of one run, read from the run store; requeued as itself when preempted.

    `env` (the launcher's network settings, `Job.env()`) is exported before the stage starts. Several tasks meet
    at the first node of the allocation (`rendezvous_address`) on a port derived from the job id.
    """

    def __init__(self, run_dir: str, stage: str, env: Mapping[str, str] | None = None) -> None:
        self.run_dir = run_dir
        self.stage = stage
        self.env = dict(env or {})

    def __call__(self) -> int:
        """Run `extrema.entry` for the stage; raise on a non-zero exit so that Slurm marks the task FAILED."""
        os.environ.update(getattr(self, "env", {}))  # calls pickled before `env` existed have none
        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            world = TorchDistributedEnvironment()
            world.master_addr = rendezvous_address(world.master_addr, job.num_nodes)
            world.export(set_cuda_visible_devices=False, overwrite=True)
        from extrema import entry

        code = entry.main([self.run_dir, self.stage])
        if code == entry.EXIT_REQUEUE:
            requeue_after_preemption()  # does not return when it requeues
            if submitit.JobEnvironment().global_rank == 0:
                raise RuntimeError(
                    f"{self.stage} of {self.run_dir} stopped at a signal (checkpoint saved); not requeued"
                )
            return code
        if code:
            raise RuntimeError(f"extrema.entry {self.run_dir} {self.stage} exited with {code}")
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Requeue the same call; progress is in the run store, not in this object."""
        return DelayedSubmission(StageCall(self.run_dir, self.stage, getattr(self, "env", {})))

    def __repr__(self) -> str:
        return f"StageCall({self.run_dir!r}, {self.stage!r})"


class SlurmBackend(Backend):
    """Submit stage jobs to Slurm as job arrays through submitit; status from sacct/squeue; cancel with scancel."""

    name = "slurm"
    shared_log_dir = True  # launcher.slurm_folder: scripts, pickles and logs every node reads

    def __init__(
        self,
        max_array_size: int | None = None,
        array_parallelism: int = ARRAY_PARALLELISM,
        max_num_timeout: int = 3,
        python: str | None = None,
        setup: Sequence[str] = (),
        timeout_s: float = CLIENT_TIMEOUT_S,
        container: ContainerSpec | None = None,
    ) -> None:
        self._max_array_size = max_array_size
        self.array_parallelism = array_parallelism
        self.max_num_timeout = max_num_timeout
        self.python = python
        self.setup = tuple(setup)
        self.timeout_s = timeout_s
        self.container = container

    @classmethod
    def from_launcher(cls, launcher: LauncherSettings, address: str | None = None) -> SlurmBackend:
        """The backend of the cluster this machine submits to (no address: `sbatch` knows it), with the launcher's
        max_parallel (each array's `%n`), max_requeues, setup lines, interpreter and container."""
        s = SlurmSettings.of(launcher)
        return cls(
            array_parallelism=s.max_parallel or ARRAY_PARALLELISM,
            max_num_timeout=s.max_requeues,
            python=s.python,
            setup=s.setup,
            container=s.container,
        )

    @classmethod
    def log_dir(cls, launcher: LauncherSettings, sweep_url: str) -> str:
        """launcher.slurm_folder, else <sweep>/logs: submitit's scripts, pickles and logs, which every node reads."""
        return SlurmSettings.of(launcher).slurm_folder or super().log_dir(launcher, sweep_url)

    @classmethod
    def job_logs(cls, kept: list[LogSource], job: RecordedJob) -> list[LogSource]:
        """The stage's own files, then its job's submitit files in the sweep's log folder, rank by rank, each line
        labelled with its node and rank."""
        log_dir = (job.manifest or {}).get("log_dir")
        if not isinstance(log_dir, str):
            return kept
        hosts = rank_hosts(job.ranks)
        tasks = [(u, slurm_rank(u)) for u in slurm_files(log_dir, job.job_id)]
        return [*kept, *(replace(file_source(u), label=slurm_label(r, hosts.get(r))) for u, r in tasks)]

    def _client(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=self.timeout_s, check=False)

    @property
    def max_array_size(self) -> int:
        """Largest array this cluster accepts (task indices run 0..MaxArraySize-1); at least 1."""
        if self._max_array_size is None:
            out = self._client("scontrol", "show", "config")
            if out.returncode:
                raise RuntimeError(f"scontrol show config failed: {out.stderr.strip()}")
            self._max_array_size = parse_max_array_size(out.stdout)
        return max(1, self._max_array_size)

    def _executor(self, folder: Path, python: str) -> submitit.SlurmExecutor:
        return submitit.SlurmExecutor(folder=folder, max_num_timeout=self.max_num_timeout, python=python)

    def submit(self, jobs: Sequence[Job], log_dir: str) -> dict[str, str]:
        """Submit jobs (in dependency order) as arrays; return job key -> Slurm id (`<array>_<i>` or `<id>`)."""
        folder = log_folder(log_dir)
        for j in jobs:
            validate_resources(j.resources)

        exclude = self.exclusions(jobs)

        def sbatch(chunk: list[Job], dependency: str | None) -> list[str]:
            ex = self._executor(folder, self.task_python(chunk, folder))
            ex.update_parameters(**self.parameters(chunk, dependency, folder, exclude.get(chunk[0].key, ())))
            with ex.batch():
                handles = [ex.submit(StageCall(j.run_dir, j.stage, j.env())) for j in chunk]
            return [h.job_id for h in handles]

        return send_arrays(jobs, self.max_array_size, sbatch, exclude)

    def exclusions(self, jobs: Sequence[Job]) -> dict[str, list[str]]:
        """The nodes each job's sbatch excludes (job key -> nodes): those its stage's failures named, as far as the
        job stays runnable on its partition (`bad_nodes.avoided`; one line on standard error names those kept)."""
        out: dict[str, list[str]] = {}
        partitions: dict[str | None, list[str] | None] = {}
        for j in jobs:
            named = (
                bad_nodes.of_stage(contract.StageDir.of(j.run_dir, j.stage).url)
                if j.resources.exclude_bad_nodes
                else []
            )
            if not named:
                continue
            part = j.resources.partition
            if part not in partitions:
                partitions[part] = self.partition_nodes(part)
            available = partitions[part]
            out[j.key], kept = bad_nodes.avoided(named, available, j.resources.nodes)
            if kept and available is not None:
                print(bad_nodes.kept_line(f"slurm: {j.key}", kept, available, j.resources.nodes), file=sys.stderr)
        return out

    def partition_nodes(self, partition: str | None) -> list[str] | None:
        """The nodes of a partition (the default one when None), whatever their state; None when sinfo does not
        answer."""
        out = self._client("sinfo", "-h", "-N", "-o", "%N|%P")
        return None if out.returncode else parse_partition_nodes(out.stdout, partition)

    @classmethod
    def lost_nodes(
        cls, launcher: LauncherSettings, address: str | None, job_ids: Sequence[str]
    ) -> dict[str, list[str]]:
        """Of these failed jobs, those Slurm ended NODE_FAIL: job id -> their nodes it marks down (or failing)."""
        return cls.from_launcher(launcher, address).node_failures(job_ids)

    @classmethod
    def avoid(
        cls, launcher: LauncherSettings, address: str | None, job_id: str, stage: str, named: list[dict[str, Any]]
    ) -> str | None:
        """Set the excluded nodes of a job Slurm queued again (`scontrol update ExcNodeList`): the bad nodes, as
        far as the stage's partition keeps enough nodes for it."""
        r = launcher.resources_for(stage)
        if not r.exclude_bad_nodes:
            return None
        backend = cls.from_launcher(launcher, address)
        available = backend.partition_nodes(r.partition)
        excluded, kept = bad_nodes.avoided(named, available, r.nodes)
        said = [bad_nodes.kept_line(f"slurm job {job_id}", kept, available, r.nodes)] if kept and available else []
        if excluded:
            nodes = ",".join(checked_nodes(excluded))
            out = backend._client("scontrol", "update", f"JobId={checked_ids([job_id])[0]}", f"ExcNodeList={nodes}")
            done = "avoids" if out.returncode == 0 else f"could not be kept off ({out.stderr.strip()[:200]})"
            said.append(f"slurm job {job_id}, queued again, {done} bad node(s) {', '.join(excluded)}")
        return "; ".join(said) or None

    def node_failures(self, job_ids: Sequence[str]) -> dict[str, list[str]]:
        """Job id -> the nodes of a NODE_FAIL job that Slurm marks down, drained or not responding."""
        ids = checked_ids(job_ids)
        bases = sorted({i.partition("_")[0] for i in ids}, key=int)
        if not bases:
            return {}
        # -D: every incarnation, so that a job Slurm queued again after the node failed still shows it.
        sacct = self._client("sacct", "-X", "-D", "-n", "-P", "-o", "JobID,State,NodeList", "-j", ",".join(bases))
        failed = {i: nodes for i, nodes in node_fails(sacct.stdout).items() if i in ids}
        if not failed:
            return {}
        down = set(self._client("sinfo", "-h", "-N", "-t", "down,drain,fail,no_respond", "-o", "%N").stdout.split())
        return {i: [n for n in self.hostnames(nodes) if n in down] for i, nodes in failed.items()}

    def hostnames(self, nodelist: str) -> list[str]:
        """The node names of a Slurm node list (`n[1-2]`), as `scontrol show hostnames` expands it."""
        if not nodelist or nodelist == "None assigned":
            return []
        return self._client("scontrol", "show", "hostnames", nodelist).stdout.split()

    def mounts(self, chunk: Sequence[Job], folder: Path) -> list[tuple[str, str]]:
        """What the container of one array's tasks mounts (nothing without a container)."""
        return [] if self.container is None else container_mounts(self.container, folder, chunk)

    def parameters(
        self, chunk: Sequence[Job], dependency: str | None, folder: Path, exclude: Sequence[str] = ()
    ) -> dict[str, Any]:
        """The sbatch parameters of one array of jobs (same resources, same job name, same nodes excluded) waiting
        on `dependency`, with logs and pickles in `folder`."""
        for i, line in enumerate(self.setup):
            reason = setup_line_problem(line)
            if reason:
                raise ValueError(f"launcher.setup: line {i + 1}: {reason}")
        setup = [*self.setup, *code_setup(chunk[0].code_dir)]
        srun = pyxis_args(self.container, self.mounts(chunk, folder))
        r = chunk[0].resources
        return sbatch_parameters(r, job_name(chunk[0]), dependency, self.array_parallelism, setup, srun, exclude)

    def task_python(self, chunk: Sequence[Job], folder: Path) -> str:
        """The interpreter every task of one array runs (in its container), as shell words."""
        gpus = chunk[0].resources.gpus_per_node > 0
        return task_python(self.python, self.container, self.mounts(chunk, folder), gpus)

    def script(self, chunk: Sequence[Job], dependency: str | None, folder: Path, exclude: Sequence[str] = ()) -> str:
        """The sbatch script `submit` sends for one array (`send_arrays`' chunk); nothing is submitted."""
        params = self.parameters(chunk, dependency, folder, exclude)
        return sbatch_script(params, folder, len(chunk), self.task_python(chunk, folder))

    def status(self, job_ids: Sequence[str]) -> dict[str, State]:
        """State of each job: from sacct, or squeue for jobs accounting does not know (yet).

        UNKNOWN when neither knows a job (it vanished). When one of them fails, jobs the other does not list are
        left out (they may simply have ended); RuntimeError when neither answers.
        """
        ids = checked_ids(job_ids)
        if not ids:
            return {}
        bases = sorted({i.partition("_")[0] for i in ids}, key=int)
        raw: dict[str, tuple[str, str]] = {}
        sacct = self._client("sacct", "-X", "-n", "-P", "-o", "JobID,State,Reason", "-j", ",".join(bases))
        if sacct.returncode == 0:
            raw.update(parse_states(sacct.stdout))
        # squeue is authoritative for live jobs: it knows jobs accounting has not recorded yet (ended ones too,
        # for MinJobAge, with `-t all`), the current pending reason (sacct keeps the one from submission), and
        # whether a job accounting shows NODE_FAIL is being queued again (COMPLETING, then PENDING).
        live = [i for i in ids if i not in raw or raw[i][0] in ("PENDING", "NODE_FAIL")]
        squeue_ok = True
        if live:
            squeue = self._client("squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r", "-j", ",".join(live))
            # squeue exits 1 with "Invalid job id specified" when every id has left the controller
            squeue_ok = squeue.returncode == 0 or "Invalid job id" in squeue.stderr
            raw.update(parse_states(squeue.stdout))
        if sacct.returncode and not squeue_ok:
            raise RuntimeError(f"neither sacct nor squeue answered: {sacct.stderr.strip() or squeue.stderr.strip()}")
        judged = sacct.returncode == 0 and squeue_ok
        return {i: to_state(*raw[i]) if i in raw else State.UNKNOWN for i in ids if i in raw or judged}

    def cancel(self, job_ids: Sequence[str]) -> None:
        """scancel the jobs; jobs that already ended are left as they are."""
        ids = checked_ids(job_ids)
        if ids:
            self._client("scancel", *ids)
