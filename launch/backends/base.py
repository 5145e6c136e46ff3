"""The backend seam: a stage `Job`, its `State`, and the three-call `Backend` Protocol.

Backends are named in `BACKENDS` and imported on demand by `make_backend`, which builds one with
`Cls.from_launcher(launcher)` (a `launch.sweep.LauncherSpec`) when the class defines that classmethod, else `Cls()`.
`status` answers UNKNOWN for a job the backend positively does not know (it vanished), leaves out ids it cannot
judge, and raises when the backend cannot be asked at all; callers then keep the run store's word.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

from extrema import contract
from extrema.code import ALLOW_CHANGE_ENV
from extrema.spec import ResourcesSpec
from launch.errors import UsageError

if TYPE_CHECKING:
    from launch.sweep import LauncherSpec

BACKENDS = {
    "local": "launch.backends.local:LocalBackend",
    "slurm": "launch.backends.slurm:SlurmBackend",
    "ray": "launch.backends.ray:RayBackend",
}


class State(str, Enum):
    """The state of a backend job."""

    PENDING = contract.PENDING
    RUNNING = contract.RUNNING
    COMPLETED = contract.COMPLETED
    FAILED = contract.FAILED
    CANCELLED = contract.CANCELLED
    PREEMPTED = contract.PREEMPTED
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Job:
    """One stage of one run, as a backend executes it."""

    key: str  # "<run_id>/<stage>"
    run_dir: str  # URL <root>/<sweep>/<run_id>
    stage: str
    after: tuple[str, ...]  # keys of jobs that must complete first (afterok)
    resources: ResourcesSpec
    code_dir: str | None = None  # a local copy of the submission's code snapshot to import from (launch.snapshot)
    allow_code_change: bool = False  # the stage may resume checkpoints written by other code

    def command(self) -> list[str]:
        """The process to start: `extrema.entry` on the run directory, under torchrun for several local ranks."""
        entry = ["-m", "extrema.entry", self.run_dir, self.stage]
        n = self.resources.processes_per_node
        if n > 1 and self.resources.nodes == 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *entry]
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
    """The launcher's network settings as the environment variables extrema.dist, gloo and NCCL read."""
    env = {contract.COLLECTIVE_TIMEOUT_ENV: f"{r.collective_timeout_s:g}"}
    if r.network_interface:
        env.update(dict.fromkeys(contract.INTERFACE_ENVS, r.network_interface))
    return env


class Backend(Protocol):
    """Submit stage jobs, ask their states, cancel them."""

    name: str
    adopts_running: bool  # True: a job submitted for a stage another attempt runs waits for it (local jobs)
    retries_in_job: bool  # True: a job may run a failed stage again by itself (Ray task retries, Ray Train)

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


def backend_class(name: str) -> Any:
    """The class of a backend by name, imported on demand; UsageError when it cannot be."""
    if name not in BACKENDS:
        raise UsageError(f"unknown backend {name!r} (known: {', '.join(BACKENDS)})")
    module, _, attr = BACKENDS[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise UsageError(f"backend {name!r} is not available here: {e}") from None


def retries_in_job(name: str) -> bool:
    """Whether a backend's job may run a stage again after an attempt recorded it failed (False when unknown)."""
    try:
        return bool(getattr(backend_class(name), "retries_in_job", False))
    except UsageError:
        return False


def adopts_running(name: str) -> bool:
    """Whether a backend's jobs can follow a stage that a live attempt owns (they wait on its lease, here)."""
    return bool(getattr(backend_class(name), "adopts_running", False))


def make_backend(name: str, launcher: LauncherSpec) -> Backend:
    """Import a backend by name and build it from the launcher settings; UsageError when it cannot be."""
    cls = backend_class(name)
    factory = getattr(cls, "from_launcher", None)
    backend: Backend = factory(launcher) if factory is not None else cls()
    return backend
