"""Slurm backend through submitit: job arrays per stage and resources, dependencies, requeue on preemption.

Jobs are grouped by dependency level, sweep, stage and resources; each group goes out as job arrays of at most
`MaxArraySize` tasks (read once from `scontrol show config`), one `sbatch` per array. A downstream array whose
task i waits for exactly task i of one upstream array uses `aftercorr:<array>`, so a failed run holds back only
its own downstream task; any other dependency is `afterok` on the per-task ids `<array>_<i>` (or on a whole
array when every task of it is awaited).

Every task runs `StageCall(run_dir, stage)`, which calls `extrema.entry.main([run_dir, stage])`. On preemption or
timeout (SIGUSR2, sent `signal_delay_s` before the time limit) submitit calls `StageCall.checkpoint()`, which
requeues the same call: training state lives in the run store, and the stage resumes from its latest complete
checkpoint. A stage that catches the signal itself saves a checkpoint and exits with 3; the signal is then handed
back to submitit, which requeues. Ranks of a multi-task stage get MASTER_ADDR/PORT, RANK, WORLD_SIZE and
LOCAL_RANK from submitit's job environment. A downstream task whose dependency can never be satisfied (its
upstream failed) is reported CANCELLED.

Every value that reaches the sbatch script (partition, account, qos, constraint, extra options, job names) is
checked against a strict character set first; anything else is a ValueError naming the field. The resource rules
are extrema.spec's (SBATCH_FIELDS, SBATCH_OPTION, SBATCH_VALUE), which already refused them at sweep validation;
they are applied again here for specs built any other way.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import submitit
from submitit.core.utils import JobPaths
from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment
from submitit.slurm.slurm import read_job_id

from extrema.spec import SBATCH_FIELDS, ResourcesSpec, sbatch_option_problem, sbatch_text_problem
from launch import roots
from launch.backends.base import Job, State, code_env

CLIENT_TIMEOUT_S = 60.0
JOB_ID = re.compile(r"\d+(?:_\d+)?")
JOB_NAME = re.compile(r"[A-Za-z0-9_.+-]{1,200}")
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


def checked(value: str, pattern: re.Pattern[str], field: str, allowed: str) -> str:
    """The value when it fully matches the pattern and has no '..'; else ValueError naming the field."""
    if not pattern.fullmatch(value) or ".." in value:
        raise ValueError(f"{field}: {value!r} cannot go into an sbatch script; allowed: {allowed}")
    return value


def validate_resources(r: ResourcesSpec) -> None:
    """Refuse any resource value that could change the sbatch script beyond its own option (extrema.spec's rules)."""
    for field, rule in SBATCH_FIELDS.items():
        value = getattr(r, field)
        reason = None if value is None else sbatch_text_problem(value, rule)
        if reason:
            raise ValueError(f"resources.{field}: {reason}")
    for key, value in r.sbatch_extra.items():
        reason = sbatch_option_problem(key, value)
        if reason:
            raise ValueError(f"resources.sbatch_extra: {reason}")


def job_name(job: Job) -> str:
    """Slurm job name `<sweep>.<stage>`, from the run directory `<root>/<sweep>/<run_id>`."""
    sweep = job.run_dir.rstrip("/").split("/")[-2] if job.run_dir.count("/") else "extrema"
    return checked(f"{sweep}.{job.stage}", JOB_NAME, "job name", "letters, digits and _ . + - (no whitespace)")


def log_folder(log_dir: str) -> Path:
    """The local (shared) directory for sbatch scripts, pickles and logs; `file://` URLs allowed."""
    if not roots.is_local(log_dir):  # the rule launcher.slurm_folder is validated with
        raise ValueError(f"log_dir: Slurm needs a path on a shared filesystem, not {log_dir!r}")
    path = log_dir.split("://", 1)[-1]
    if any(ch in path for ch in "\n\r\0"):
        raise ValueError(f"log_dir: {log_dir!r} contains a control character")
    return Path(path)


def log_files(log_dir: str, job_id: str) -> tuple[Path, Path]:
    """(stdout, stderr) files of a submitted job or array task."""
    paths = JobPaths(log_folder(log_dir), job_id=job_id, task_id=0)
    return paths.stdout, paths.stderr


def signal_delay_s(time_min: int) -> int:
    """Seconds before the time limit at which Slurm sends USR2 (checkpoint and requeue)."""
    return max(10, min(90, time_min * 6))


def executor_parameters(
    r: ResourcesSpec, name: str, dependency: str | None, array_parallelism: int, setup: Sequence[str] = ()
) -> dict[str, Any]:
    """submitit AutoExecutor parameters for one array (values already validated)."""
    params: dict[str, Any] = {
        "name": name,
        "nodes": r.nodes,
        "tasks_per_node": r.processes_per_node,
        "cpus_per_task": r.cpus_per_task,
        "timeout_min": r.time_min,
        "slurm_signal_delay_s": signal_delay_s(r.time_min),
        "slurm_array_parallelism": array_parallelism,
    }
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    if r.mem_gb is not None:
        params["mem_gb"] = r.mem_gb
    optional = {
        "slurm_partition": r.partition,
        "slurm_account": r.account,
        "slurm_qos": r.qos,
        "slurm_constraint": r.constraint,
        "slurm_dependency": dependency,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if r.sbatch_extra:
        params["slurm_additional_parameters"] = {k: (v if v else True) for k, v in r.sbatch_extra.items()}
    if setup:
        params["slurm_setup"] = list(setup)
    return params


def dependency_levels(jobs: Sequence[Job]) -> dict[str, int]:
    """Longest chain of in-call dependencies above each job; jobs must come after the jobs they wait for."""
    keys = {j.key for j in jobs}
    if len(keys) != len(jobs):
        raise ValueError("jobs: duplicate job keys")
    level: dict[str, int] = {}
    for j in jobs:
        ups = [a for a in j.after if a in keys]
        for a in ups:
            if a not in level:
                raise ValueError(f"jobs: {j.key} comes before {a}, which it waits for")
        level[j.key] = 1 + max((level[a] for a in ups), default=-1)
    return level


def array_groups(jobs: Sequence[Job]) -> list[list[Job]]:
    """Jobs grouped by (level, job name, resources), levels in order, groups in order of first appearance."""
    level = dependency_levels(jobs)
    groups: dict[tuple[int, str, str], list[Job]] = {}
    for j in jobs:
        groups.setdefault((level[j.key], job_name(j), j.resources.model_dump_json()), []).append(j)
    return [groups[k] for k in sorted(groups, key=lambda k: k[0])]


def task_sort_key(job_id: str) -> tuple[int, int]:
    """Numeric order of `<id>` and `<array>_<i>` ids."""
    base, _, index = job_id.partition("_")
    return int(base), int(index) if index else -1


def afterok(job_ids: set[str], array_sizes: Mapping[str, int]) -> str | None:
    """`afterok:` on the given ids, naming a whole array when every one of its tasks is awaited."""
    if not job_ids:
        return None
    tasks: dict[str, set[int]] = {}
    for i in job_ids:
        base, _, index = i.partition("_")
        if index:
            tasks.setdefault(base, set()).add(int(index))
    whole = {b for b, idx in tasks.items() if idx == set(range(array_sizes.get(b, -1)))}
    out = {i for i in job_ids if i.partition("_")[0] not in whole} | whole
    return "afterok:" + ":".join(sorted(out, key=task_sort_key))


def plan_arrays(
    group: Sequence[Job], ids: Mapping[str, str], array_sizes: Mapping[str, int], max_size: int
) -> list[tuple[list[Job], str | None]]:
    """Split one group into arrays with their dependency: aftercorr where task i waits for exactly task i of one
    upstream array, else afterok, in chunks of at most max_size."""
    corr: dict[str, dict[int, Job]] = {}
    for j in group:
        ups = [ids[a] for a in j.after if a in ids]
        if len(ups) == 1 and "_" in ups[0]:
            base, _, index = ups[0].partition("_")
            corr.setdefault(base, {}).setdefault(int(index), j)
    plans: list[tuple[list[Job], str | None]] = []
    placed: set[str] = set()
    for base, by_index in corr.items():
        if len(by_index) > 1 and sorted(by_index) == list(range(len(by_index))) and len(by_index) <= max_size:
            chunk = [by_index[i] for i in range(len(by_index))]
            plans.append((chunk, f"aftercorr:{base}"))
            placed.update(j.key for j in chunk)
    rest = [j for j in group if j.key not in placed]
    for start in range(0, len(rest), max_size):
        chunk = rest[start : start + max_size]
        awaited = {ids[a] for j in chunk for a in j.after if a in ids}
        plans.append((chunk, afterok(awaited, array_sizes)))
    return plans


def send_arrays(
    jobs: Sequence[Job], max_size: int, sbatch: Callable[[list[Job], str | None], list[str]]
) -> dict[str, str]:
    """Send every array of the jobs with `sbatch(chunk, dependency) -> ids`, one call per array, levels in order;
    job key -> id. `SlurmBackend.submit` passes a real submission, `planned_arrays` a stand-in."""
    ids: dict[str, str] = {}
    array_sizes: dict[str, int] = {}
    for group in array_groups(jobs):
        for chunk, dependency in plan_arrays(group, ids, array_sizes, max_size):
            got = sbatch(chunk, dependency)
            ids.update(zip((j.key for j in chunk), got))
            array_sizes[got[0].partition("_")[0]] = len(got)
    return ids


def planned_arrays(jobs: Sequence[Job], max_size: int) -> list[tuple[list[str], str | None]]:
    """The arrays `submit` sends, one `sbatch` each, as (job keys, dependency), with stand-in job ids 1, 2, ...
    (an array of one job is a plain job, as submitit submits it). Pure: nothing is submitted."""
    sent: list[tuple[list[str], str | None]] = []

    def stand_in(chunk: list[Job], dependency: str | None) -> list[str]:
        sent.append(([j.key for j in chunk], dependency))
        base = str(len(sent))
        return [base] if len(chunk) == 1 else [f"{base}_{i}" for i in range(len(chunk))]

    send_arrays(jobs, max_size, stand_in)
    return sent


def parse_max_array_size(config: str) -> int:
    """MaxArraySize from `scontrol show config` output."""
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.MULTILINE)
    if m is None:
        raise RuntimeError("scontrol show config did not report MaxArraySize")
    return int(m.group(1))


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


def checked_ids(job_ids: Sequence[str]) -> list[str]:
    """Distinct Slurm job ids (`<id>` or `<array>_<i>`); ValueError for anything else, never an option."""
    ids = list(dict.fromkeys(job_ids))
    for i in ids:
        if not JOB_ID.fullmatch(i):
            raise ValueError(f"job id {i!r} is not a Slurm job id (<id> or <array>_<index>)")
    return ids


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


SAFE_PATH = re.compile(r"/[A-Za-z0-9_.,:@%+=/-]{0,4000}")


def code_setup(code_dir: str | None) -> list[str]:
    """sbatch script lines that make every task (and its requeues) import the project from the submission's code
    snapshot: before Python starts, since submitit unpickles the stage call with whatever it finds first."""
    if code_dir is None:
        return []
    if not SAFE_PATH.fullmatch(code_dir) or ".." in code_dir.split("/"):
        raise ValueError(f"code snapshot directory {code_dir!r} cannot go into an sbatch script")
    env = code_env(code_dir, None)
    return [
        f"export PYTHONPATH={shlex.quote(env['PYTHONPATH'])}${{PYTHONPATH:+:$PYTHONPATH}}",
        f"export PYTHONSAFEPATH={env['PYTHONSAFEPATH']}",
    ]


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


class SlurmBackend:
    """Submit stage jobs to Slurm as job arrays through submitit; status from sacct/squeue; cancel with scancel."""

    name = "slurm"
    adopts_running = False
    retries_in_job = False

    def __init__(
        self,
        max_array_size: int | None = None,
        array_parallelism: int = 256,
        max_num_timeout: int = 3,
        python: str | None = None,
        setup: Sequence[str] = (),
        timeout_s: float = CLIENT_TIMEOUT_S,
    ) -> None:
        self._max_array_size = max_array_size
        self.array_parallelism = array_parallelism
        self.max_num_timeout = max_num_timeout
        self.python = python
        self.setup = tuple(setup)
        self.timeout_s = timeout_s

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

    def _executor(self, folder: Path) -> submitit.AutoExecutor:
        kwargs: dict[str, Any] = {"slurm_max_num_timeout": self.max_num_timeout}
        if self.python is not None:
            kwargs["slurm_python"] = self.python
        return submitit.AutoExecutor(folder=folder, cluster="slurm", **kwargs)

    def submit(self, jobs: Sequence[Job], log_dir: str) -> dict[str, str]:
        """Submit jobs (in dependency order) as arrays; return job key -> Slurm id (`<array>_<i>` or `<id>`)."""
        folder = log_folder(log_dir)
        for j in jobs:
            validate_resources(j.resources)

        def sbatch(chunk: list[Job], dependency: str | None) -> list[str]:
            ex = self._executor(folder)
            r = chunk[0].resources
            setup = [*self.setup, *code_setup(chunk[0].code_dir)]
            ex.update_parameters(
                **executor_parameters(r, job_name(chunk[0]), dependency, self.array_parallelism, setup)
            )
            with ex.batch():
                handles = [ex.submit(StageCall(j.run_dir, j.stage, j.env())) for j in chunk]
            return [h.job_id for h in handles]

        return send_arrays(jobs, self.max_array_size, sbatch)

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
        # for MinJobAge, with `-t all`), and the current pending reason (sacct keeps the one from submission).
        live = [i for i in ids if i not in raw or raw[i][0] == "PENDING"]
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
