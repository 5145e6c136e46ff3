"""The backend seam: a stage `Job`, its `State`, and the `Backend` Protocol, which carries everything that differs
from backend to backend; nothing outside `launch/backends` names a backend.

Backends are named in `BACKENDS` and imported on demand by `backend_class`; `make_backend` builds one with
`Cls.from_launcher(launcher, address)` (a sweep's launcher settings, and the cluster a recorded job went to). The
settings every backend reads are `LauncherSettings`; each backend declares its own in a subclass of it (as
submitit's executors own their parameters) and reads them through `<its settings>.of(launcher)`; a sweep file's
`launch.sweepfile.model.LauncherSpec` joins them all.
Three calls do the work: `submit`, `status`, `cancel`. `status` answers UNKNOWN for a job the backend positively
does not know (it vanished), leaves out ids it cannot judge, and raises when the backend cannot be asked at all;
callers then keep the run store's word. The rest are class-level facts and hooks with defaults (a backend keeps
those it agrees with): whether its jobs wait for a live attempt (`adopts_running`) or retry a failed stage by
themselves (`retries_in_job`), whether `sweep` stays while the stages run (`runs_here`), where a recorded job's
cluster is (`recorded_address`), the cluster a sweep starts for itself (`private_cluster`) and what to keep before
it stops (`keep_logs`), which nodes a failed job lost (`lost_nodes`) and how a requeued one avoids them (`avoid`),
where a job's logs are (`log_dir`, `job_logs`), and how to stop the attempts it started on this machine
(`stop_attempts`).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from extrema.run import contract, lease, rank_progress, rundir
from extrema.run.code_snapshot import ALLOW_CHANGE_ENV
from extrema.run.contract import StageState
from extrema.spec import StageName
from launch.backends.resources import ResourcesSpec
from launch.inputs.errors import UsageError
from launch.inputs.yamlfile import deep_merge

if TYPE_CHECKING:
    from rich.console import Console

    from launch.backends.log_source import LogSource

BACKENDS = {
    "local": "launch.backends.local:LocalBackend",
    "slurm": "launch.backends.slurm.backend:SlurmBackend",
    "ray": "launch.backends.ray.backend:RayBackend",
}
SWEEP_LOGS = "logs"  # <root>/<sweep>/logs/: a backend's log folder, unless its settings name another


class LauncherSettings(BaseModel):
    """What every backend reads of a sweep file's `launcher`: the backend (a name in BACKENDS), the resources of its
    stage jobs (`stages` entries override `resources` key by key) and how many run at once (`max_parallel`, each
    backend's own default when unset). Each backend's own settings extend it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: str = Field("local", description="where stages run: local, slurm or ray")
    resources: ResourcesSpec = ResourcesSpec()
    stages: dict[StageName, ResourcesSpec] = Field(
        default_factory=dict, description="per-stage resources, overriding launcher.resources key by key"
    )
    max_parallel: int | None = Field(
        None, ge=1, description="stage jobs at once: local 1 unless set; slurm each array's %n (256); ray unbounded"
    )

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("stages"), dict):
            base = data.get("resources") or {}
            if isinstance(base, ResourcesSpec):
                base = base.model_dump()
            if isinstance(base, dict) and _valid_resources(base):  # a bad default is reported once, not per stage
                stages = {k: deep_merge(base, v) if isinstance(v, dict) else v for k, v in data["stages"].items()}
                data = {**data, "stages": stages}
        return data

    @field_validator("backend", mode="before")
    @classmethod
    def _known(cls, value: Any) -> Any:
        if not (isinstance(value, str) and value in BACKENDS):  # refused as a Literal of BACKENDS' names would be
            names = [repr(n) for n in BACKENDS]
            expected = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
            raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})
        return value

    @classmethod
    def of(cls, launcher: LauncherSettings) -> Self:
        """`launcher` as these settings: a sweep's launcher (`launch.sweepfile.model.LauncherSpec`) holds every
        backend's."""
        assert isinstance(launcher, cls), f"{type(launcher).__name__} lacks the settings of {cls.__name__}"
        return launcher

    def resources_for(self, stage: str) -> ResourcesSpec:
        """The resources of one stage: its own entry, else the default."""
        return self.stages.get(stage, self.resources)  # type: ignore[call-overload]

    def root_problem(self, root: str) -> tuple[str, str] | None:
        """(a field of these settings, why) when the backend cannot work with the run store at `root`; None when it
        can. Each backend's settings add their own rules (calling this one last)."""
        return None


def _valid_resources(raw: dict[str, Any]) -> bool:
    try:
        ResourcesSpec.model_validate(raw)
    except ValidationError:
        return False
    return True


class State(str, Enum):
    """The state of a backend job: a stage state (its value is the StageState's), or UNKNOWN."""

    PENDING = StageState.PENDING
    RUNNING = StageState.RUNNING
    COMPLETED = StageState.COMPLETED
    FAILED = StageState.FAILED
    CANCELLED = StageState.CANCELLED
    PREEMPTED = StageState.PREEMPTED
    UNKNOWN = "unknown"  # the backend positively does not know the job (it vanished)
    ELSEWHERE = "elsewhere"  # queued or run by a process of another host, which cannot be seen from here


@dataclass(frozen=True)
class Job:
    """One stage of one run as a backend submits it (`launch.pipeline.plan` makes them): the run directory and stage
    `extrema.entry` runs (its spec.json holds the RunSpec), the jobs it waits for, and its resources."""

    key: str  # "<run_id>/<stage>"
    run_dir: str  # URL <root>/<sweep>/<run_id>
    stage: str
    after: tuple[str, ...]  # keys of jobs that must complete first (afterok)
    resources: ResourcesSpec
    # a local copy of the submission's code snapshot to import from (launch.runstore.snapshot)
    code_dir: str | None = None
    allow_code_change: bool = False  # the stage may resume checkpoints written by other code

    def command(self) -> list[str]:
        """The process to start: `extrema.entry` on the run directory; several ranks on one node forked by it on
        CPUs, started by torchrun on GPUs (CUDA cannot be used in a child forked after its driver was initialised,
        and no GPU has proven that nothing does so before the fork)."""
        entry = ["-m", "extrema.entry", self.run_dir, self.stage]
        n = self.resources.processes_per_node
        if n > 1 and self.resources.nodes == 1 and self.resources.gpus_per_node:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *entry]
        if n > 1 and self.resources.nodes == 1:
            return [sys.executable, *entry[:2], f"--processes={n}", *entry[2:]]
        return [sys.executable, *entry]

    def env(self) -> dict[str, str]:
        """Environment every rank of the job gets: the collective timeout and, when set, the network interface,
        and the permission to resume across a code change when given."""
        env = network_env(self.resources)
        if self.allow_code_change:
            env[ALLOW_CHANGE_ENV] = "1"
        return env


def code_env(code_dir: str, pythonpath: str | None) -> dict[str, str]:
    """What makes a Python process import the project from a snapshot directory: it goes first on PYTHONPATH, and
    the current directory (a checkout, perhaps edited since) is kept off sys.path (PYTHONSAFEPATH, Python 3.11+)."""
    return {"PYTHONPATH": os.pathsep.join([code_dir, *([pythonpath] if pythonpath else [])]), "PYTHONSAFEPATH": "1"}


def network_env(r: ResourcesSpec) -> dict[str, str]:
    """The launcher's network settings as the environment variables extrema.train.dist, gloo and NCCL read, and NCCL's
    error handling and flight recorder (contract.NCCL_ENV) where the submitter's environment does not set them."""
    env = {k: v for k, v in contract.NCCL_ENV.items() if k not in os.environ}
    env[contract.COLLECTIVE_TIMEOUT_ENV] = f"{r.collective_timeout_s:g}"
    if r.hang_timeout_s != rank_progress.DEFAULT_HANG_TIMEOUT_S:  # the ranks' default otherwise
        env[rank_progress.HANG_TIMEOUT_ENV] = f"{r.hang_timeout_s:g}"
    if r.straggler_action != rank_progress.STRAGGLER_ACTIONS[0]:
        env[rank_progress.STRAGGLER_ACTION_ENV] = r.straggler_action
    if r.network_interface:
        env.update(dict.fromkeys(contract.INTERFACE_ENVS, r.network_interface))
    return env


@dataclass(frozen=True)
class PrivateCluster:
    """A cluster a sweep starts for itself when its launcher names none, and stops when the sweep ends."""

    what: str  # as the plan shows it: "a local Ray head started for this sweep"
    # Starts it (printing what it does); yields the launcher pointing at it and the manifest entries recording it.
    start: Callable[[Console], AbstractContextManager[tuple[LauncherSettings, dict[str, Any]]]]


@dataclass(frozen=True)
class RecordedJob:
    """A stage's current job as the run store records it, with what its backend needs to find the job's logs."""

    job_id: str
    status: Mapping[str, Any]  # the stage's status.json
    manifest: Mapping[str, Any] | None  # the sweep's manifest (its log folder)
    launcher: LauncherSettings
    ranks: object = None  # provenance's list of every rank's host and pid, to label each line


class Unreachable(Exception):
    """A backend that cannot be asked about its jobs, for a reason the message says in full."""


class Backend(Protocol):
    """Submit stage jobs, ask their states, cancel them; and everything else that differs from backend to backend.

    Every backend class subclasses this explicitly and keeps the defaults it agrees with.
    """

    name: ClassVar[str]
    adopts_running: ClassVar[bool] = False  # a job submitted for a stage another attempt runs waits for it
    retries_in_job: ClassVar[bool] = False  # a job may run a failed stage again by itself (Ray retries)
    runs_here: ClassVar[bool] = False  # the stages run as children of `sweep`, which shows progress until they end
    shared_log_dir: ClassVar[bool] = False  # the log folder is on a filesystem every node sees: jobs' copies go there
    address: str | None = None  # the cluster this backend submits to, recorded with each job (None: one place)

    @classmethod
    def from_launcher(cls, launcher: LauncherSettings, address: str | None = None) -> Backend:
        """The backend for a sweep's launcher settings, at the cluster `address` when given."""
        return cls()

    @classmethod
    def recorded_address(cls, status: Mapping[str, Any], launcher: LauncherSettings) -> str | None:
        """The cluster a stage's job went to, from its status record (else the launcher's); None: one place."""
        return None

    @classmethod
    def private_cluster(cls, launcher: LauncherSettings) -> PrivateCluster | None:
        """The cluster a sweep of these launcher settings starts for itself, or None when it needs none."""
        return None

    @classmethod
    def states(
        cls, launcher: LauncherSettings, address: str | None, manifest: Mapping[str, Any] | None, job_ids: Sequence[str]
    ) -> dict[str, State]:
        """The states of jobs recorded at `address` (see `status`); Unreachable when they cannot be asked."""
        return cls.from_launcher(launcher, address).status(job_ids)

    @classmethod
    def lost_nodes(
        cls, launcher: LauncherSettings, address: str | None, job_ids: Sequence[str]
    ) -> dict[str, list[str]]:
        """Of these failed jobs recorded at `address`, those the cluster ended for a failed node: job id -> the
        nodes it marks failed ({}: the backend does not say)."""
        return {}

    @classmethod
    def avoid(
        cls, launcher: LauncherSettings, address: str | None, job_id: str, stage: str, named: list[dict[str, Any]]
    ) -> str | None:
        """Keep a job the cluster queued again for `stage` off the bad nodes `named` (`extrema.run.bad_nodes`), as
        far as it stays runnable; a line saying what was done or kept, None when nothing (the default: the backend
        does not requeue jobs itself)."""
        return None

    @classmethod
    def log_dir(cls, launcher: LauncherSettings, sweep_url: str) -> str:
        """The folder a sweep's jobs keep their logs (and, where the nodes share it, code) in: <sweep>/logs."""
        return rundir.join(sweep_url, SWEEP_LOGS)

    @classmethod
    def job_logs(cls, kept: list[LogSource], job: RecordedJob) -> list[LogSource]:
        """Every log of a stage's job: the stage's own `logs/` files (`kept`) and those the backend keeps."""
        return kept

    @classmethod
    def stop_attempts(cls, sweep_url: str, holders: Mapping[str, lease.Holder]) -> dict[str, str]:
        """Stop the attempts of this backend, among the live holders of these stages' leases (by job key), that run
        as processes of this machine rather than as jobs `cancel` stops; key -> why one was not stopped."""
        return {}

    def submit(self, jobs: Sequence[Job], log_dir: str) -> dict[str, str]:
        """Submit jobs (given in dependency order; `after` keys name jobs of this call or already-completed ones).

        Returns job key -> backend job id.
        """
        ...

    def status(self, job_ids: Sequence[str]) -> dict[str, State]:
        """The state of each backend job id."""
        ...

    def cancel(self, job_ids: Sequence[str]) -> None:
        """Cancel the given backend jobs."""
        ...

    def keep_logs(self, ids: Mapping[str, str], jobs: Mapping[str, Job]) -> None:
        """Save what the jobs' logs need before a private cluster that holds them stops (ids: job key -> id)."""


def backend_class(name: str) -> type[Backend]:
    """The class of a backend by name, imported on demand; UsageError when it cannot be."""
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    module, _, attr = BACKENDS[name].partition(":")
    try:
        cls: type[Backend] = getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise UsageError(f"backend {name!r} is not available here: {e}") from None
    return cls


def recorded_class(name: object) -> type[Backend] | None:
    """The class of the backend a status record names, or None when it is unknown or not available here."""
    try:
        return backend_class(name) if isinstance(name, str) else None
    except UsageError:
        return None


def make_backend(name: str, launcher: LauncherSettings, address: str | None = None) -> Backend:
    """Import a backend by name and build it from the launcher settings (at `address`); UsageError when it cannot
    be."""
    return backend_class(name).from_launcher(launcher, address)


def in_flight_groups(
    statuses: Mapping[str, Mapping[str, Any]], launcher: LauncherSettings
) -> dict[tuple[str, str | None], dict[str, str]]:
    """The recorded jobs of these stages (job key -> status record) grouped by backend and cluster address:
    (backend name, address) -> job key -> job id. Records without a job id or a known backend are left out."""
    groups: dict[tuple[str, str | None], dict[str, str]] = {}
    for key, s in statuses.items():
        name = s.get("backend")
        if not s.get("job_id") or name not in BACKENDS:
            continue
        cls = recorded_class(name)
        address = cls.recorded_address(s, launcher) if cls is not None else None
        groups.setdefault((str(name), address), {})[key] = str(s["job_id"])
    return groups
