"""What one stage job asks of its backend (`ResourcesSpec`), and the rules for every value that may reach an sbatch
script: applied when a ResourcesSpec is validated (every backend, at sweep validation) and again by the Slurm backend
before each submission. Launcher settings, never part of a run's identity."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from extrema.check.devices import GpuType
from extrema.run.rank_progress import DEFAULT_HANG_TIMEOUT_S
from extrema.spec import DEFAULT_COLLECTIVE_TIMEOUT_S, Spec

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMES = (re.compile(r"[A-Za-z0-9_.-]+(?:,[A-Za-z0-9_.-]+)*"), "letters, digits, '_', '.', '-', comma-separated")
SBATCH_FIELDS: dict[str, tuple[re.Pattern[str], str]] = {
    "partition": _NAMES,
    "account": _NAMES,
    "qos": _NAMES,
    "constraint": (re.compile(r"[A-Za-z0-9_.,:|&!*()\[\]]+"), "feature names and the operators & | ! * , : ( ) [ ]"),
}
SBATCH_OPTION = (re.compile(r"[a-z][a-z0-9-]{0,63}"), "long option names of lowercase letters, digits and '-'")
SBATCH_VALUE = (re.compile(r"[A-Za-z0-9_.,:@%=+/\[\]-]{0,512}"), "letters, digits and _ . , : @ % = + / [ ] -")
# Options submitit or the Slurm backend set itself; overriding them would break logs, arrays or requeueing.
INTERFACE = re.compile(r"[A-Za-z0-9_.:-]{1,15}")  # Linux IFNAMSIZ; no '/' or whitespace
MANAGED_SBATCH_OPTIONS = frozenset(
    {"array", "dependency", "error", "job-name", "open-mode", "output", "parsable", "signal", "wrap", "wckey"}
    | {"cpus-per-task", "nodes", "ntasks-per-node", "gpus-per-node"}  # resources fields; the srun line repeats some
)


def _quoted(value: str) -> str:
    return repr(value) if len(value) <= 80 else repr(value[:77]) + "..."


def sbatch_text_problem(value: str, rule: tuple[re.Pattern[str], str]) -> str | None:
    """Why `value` cannot go into an sbatch script under `rule` (pattern, what it allows); None when it can."""
    if _CONTROL.search(value):
        return f"contains a control character (newline, tab, ...): {_quoted(value)}"
    if not rule[0].fullmatch(value) or ".." in value:
        return f"{_quoted(value)} cannot go into an sbatch script; allowed: {rule[1]}"
    return None


def sbatch_option_problem(name: str, value: str) -> str | None:
    """Why an extra sbatch option `--name=value` is refused; None when it may go into an sbatch script."""
    if sbatch_text_problem(name, SBATCH_OPTION):
        return f"option name {_quoted(name)} is not a plain sbatch option name; allowed: {SBATCH_OPTION[1]}"
    if name in MANAGED_SBATCH_OPTIONS:
        return f"option {name!r} is set by the launcher itself and cannot be overridden"
    reason = sbatch_text_problem(value, SBATCH_VALUE)
    return f"option {name!r}: {reason}" if reason else None


MAX_NODES = 10_000  # far beyond any job's nodes: a typo (or a hostile spec) is refused, not submitted
MAX_PER_NODE = 1_024  # ranks, GPUs or cores of one node: the local backend starts that many processes


class ResourcesSpec(Spec):
    """What one stage job asks of its backend. Launcher settings: never part of a run's identity.

    partition, account, qos, constraint and sbatch_extra are checked against SBATCH_FIELDS / SBATCH_OPTION /
    SBATCH_VALUE whatever the backend, so a value that could not go into an sbatch script is refused at validation.
    """

    nodes: int = Field(1, ge=1, le=MAX_NODES, description="nodes of one job; its ranks are spread over them")
    processes_per_node: int = Field(
        1, ge=1, le=MAX_PER_NODE, description="training processes (ranks) per node (the local backend starts them all)"
    )
    gpus_per_node: int = Field(0, ge=0, le=MAX_PER_NODE, description="GPUs per node (0: CPU only); each rank uses one")
    cpus_per_task: int = Field(
        1, ge=1, le=MAX_PER_NODE, description="CPU cores per rank (data loading workers included)"
    )
    mem_gb: float | None = Field(
        None, gt=0, allow_inf_nan=False, description="memory per node in GB (sbatch --mem; unset: the default)"
    )
    time_min: int = Field(60, ge=1, description="time limit of one job in minutes (Slurm requeues it past that)")
    partition: str | None = Field(None, description="Slurm partition (sbatch --partition)")
    account: str | None = Field(None, description="Slurm account charged (sbatch --account)")
    qos: str | None = Field(None, description="Slurm quality of service (sbatch --qos)")
    constraint: str | None = Field(None, description="Slurm node features required (sbatch --constraint)")
    sbatch_extra: dict[str, str] = Field(default_factory=dict, description="extra sbatch options, name -> value")
    network_interface: str | None = Field(
        None, description="network interface for collectives between nodes (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME)"
    )
    collective_timeout_s: float = Field(
        DEFAULT_COLLECTIVE_TIMEOUT_S,
        gt=0,
        le=86_400,
        allow_inf_nan=False,
        description="seconds a rank waits in one collective",
    )
    hang_timeout_s: float = Field(
        DEFAULT_HANG_TIMEOUT_S,
        ge=0,
        le=86_400,
        allow_inf_nan=False,
        description="seconds without a finished step (or a rank's progress record) before the stage counts as hung "
        "and every rank ends with its stacks dumped; 0: off",
    )
    straggler_action: Literal["flag", "fail"] = Field(
        "flag",
        description="what a rank persistently slower than the others at loading data (its node slow) does: flag: "
        "shown in status and the stage's records; fail: the attempt ends as for a hang, naming the node bad, so that "
        "the retry avoids it (needs hang_timeout_s > 0)",
    )
    exclude_bad_nodes: bool = Field(
        True,
        description="the next attempt of a stage avoids the nodes its failures named (a hung rank's, a lost one's; "
        "slurm: sbatch --exclude, ray: a placement without them) while enough nodes remain for the job",
    )

    gpu_type: GpuType | None = Field(
        None,
        description="the GPU of the job's nodes, from the check's device table (H100, H200, A100-40GB, A100-80GB, "
        "V100, L40S): sweep predicts each pretraining stage's memory per GPU and time before submitting and "
        "refuses a stage that does not fit (extrema-launch check)",
    )
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="memory of one GPU in GB as its vendor states it (the GPU type's when unset): sweep refuses a "
        "pretraining stage predicted to need more per GPU than 90% of it (extrema-launch check)",
    )

    allow_idle_gpus: bool = Field(
        False,
        description="let a job ask for more GPUs per node than it runs processes per node (each rank uses one GPU; "
        "the rest stay idle); without it such resources are refused",
    )

    @field_validator("network_interface")
    @classmethod
    def _interface(cls, value: str | None) -> str | None:
        if value is not None and not INTERFACE.fullmatch(value):
            raise ValueError(f"{_quoted(value)} is not a network interface name (1-15 of letters, digits, _ . : -)")
        return value

    @field_validator("straggler_action")
    @classmethod
    def _straggler_action(cls, value: str, info: ValidationInfo) -> str:
        if value == "fail" and info.data.get("hang_timeout_s") == 0:
            raise ValueError("fail needs the watchdog, which hang_timeout_s 0 turns off")
        return value

    @field_validator(*SBATCH_FIELDS)
    @classmethod
    def _sbatch_field(cls, value: str | None, info: ValidationInfo) -> str | None:
        reason = None if value is None else sbatch_text_problem(value, SBATCH_FIELDS[str(info.field_name)])
        if reason:
            raise ValueError(reason)
        return value

    @field_validator("sbatch_extra")
    @classmethod
    def _sbatch_options(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            reason = sbatch_option_problem(name, text)
            if reason:
                raise ValueError(reason)
        return value

    def idle_gpus_problem(self) -> str | None:
        """Why these resources leave GPUs idle (more GPUs per node than ranks per node, allow_idle_gpus unset);
        None when every GPU gets a rank."""
        if self.allow_idle_gpus or self.gpus_per_node <= self.processes_per_node:
            return None
        idle, gpus = self.gpus_per_node - self.processes_per_node, self.gpus_per_node
        return (
            f"gpus_per_node {gpus} with processes_per_node {self.processes_per_node} leaves {idle} of each node's "
            f"{gpus} GPUs idle ({self.world_size} ranks on {self.nodes * gpus} GPUs): give processes_per_node: {gpus} "
            "(one rank per GPU), or allow_idle_gpus: true"
        )

    @property
    def world_size(self) -> int:
        """Total training processes of the job."""
        return self.nodes * self.processes_per_node
