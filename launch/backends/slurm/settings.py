"""The Slurm backend's own launcher settings: where submitit writes its scripts, pickles and logs, the lines each
sbatch script runs before its tasks, how often a job is requeued after its time limit; and (from
`launch.backends.container`) the image and interpreter its tasks run."""

from __future__ import annotations

import re
from typing import Self

from pydantic import Field, field_validator, model_validator

from extrema.spec import located
from launch.backends.container import ContainerSettings
from launch.inputs.printable import no_control, shown
from launch.runstore import roots

NAME = "slurm"  # the backend's name in launch.backends.base.BACKENDS
MAX_REQUEUES = 100
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def setup_line_problem(line: str) -> str | None:
    """Why a setup line cannot go into an sbatch script; None when it can. A line is the user's own shell (that is
    its purpose: `module load cuda`), but it stays one line and never an `#SBATCH` directive: before the first
    command sbatch still reads `#` lines as options."""
    if _CONTROL.search(line):
        return f"contains a control character (newline, tab, ...): {shown(line)}"
    if line.lstrip().startswith("#"):
        return f"{shown(line)} is a comment, which sbatch could read as an #SBATCH option; write commands only"
    if not line.strip():
        return "an empty line"
    return None


class SlurmSettings(ContainerSettings):
    """`launcher.slurm_folder`: submitit's folder on a filesystem every node sees (default <root>/<sweep>/logs);
    `launcher.setup`: shell lines each sbatch script runs before srun starts the tasks (`module load ...`), outside
    any container; `launcher.max_requeues`: requeues of a job that reached its time limit (a preempted job is
    always requeued)."""

    slurm_folder: str | None = Field(None, description="slurm backend: submitit log folder; <root>/<sweep>/logs")
    setup: tuple[str, ...] = Field((), description="slurm backend: shell lines run before the tasks (module load ...)")
    max_requeues: int = Field(
        3, ge=0, le=MAX_REQUEUES, description="slurm backend: requeues after the time limit (preemptions: always)"
    )

    @field_validator("slurm_folder")
    @classmethod
    def _slurm_folder(cls, value: str | None) -> str | None:
        no_control(value)
        if value is not None and not roots.is_local(value):
            raise ValueError(f"{shown(value)}: Slurm writes its logs to a path on a shared filesystem, not a URL")
        return value

    @field_validator("setup")
    @classmethod
    def _setup(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, line in enumerate(value):
            reason = setup_line_problem(line)
            if reason:
                raise ValueError(f"line {i + 1}: {reason}")
        return value

    @model_validator(mode="after")
    def _container_on_srun(self) -> Self:
        """`sbatch_extra: {container-image: ...}` would start the batch script itself in the image, without srun's
        setup and with the submitter's interpreter: launcher.container starts each task in it instead."""
        for label, res in [("resources", self.resources), *((f"stages.{k}", v) for k, v in self.stages.items())]:
            for option in res.sbatch_extra:
                if self.backend == NAME and option.startswith("container-"):
                    raise located(
                        f"{label}.sbatch_extra",
                        f"option {option!r} would run the batch script in the container, not its tasks; "
                        "use launcher.container (image, runtime: pyxis | apptainer, mounts)",
                    )
        return self

    def root_problem(self, root: str) -> tuple[str, str] | None:
        """Slurm's logs need a shared filesystem: a run store elsewhere needs slurm_folder."""
        if self.backend == NAME and self.slurm_folder is None and not roots.is_local(root):
            return (
                "slurm_folder",
                f"the slurm backend writes its logs to a shared filesystem; the root {shown(root)} is not one, "
                "so set launcher.slurm_folder to a shared directory",
            )
        return super().root_problem(root)
