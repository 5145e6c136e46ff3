"""The Slurm backend's own launcher settings: where submitit writes its scripts, pickles and logs."""

from __future__ import annotations

from pydantic import Field, field_validator

from launch import roots
from launch.backends.base import LauncherSettings
from launch.printable import no_control, shown

NAME = "slurm"  # the backend's name in launch.backends.base.BACKENDS


class SlurmSettings(LauncherSettings):
    """`launcher.slurm_folder`: submitit's folder on a filesystem every node sees (default <root>/<sweep>/logs)."""

    slurm_folder: str | None = Field(None, description="slurm backend: submitit log folder; <root>/<sweep>/logs")

    @field_validator("slurm_folder")
    @classmethod
    def _slurm_folder(cls, value: str | None) -> str | None:
        no_control(value)
        if value is not None and not roots.is_local(value):
            raise ValueError(f"{shown(value)}: Slurm writes its logs to a path on a shared filesystem, not a URL")
        return value

    def root_problem(self, root: str) -> tuple[str, str] | None:
        """Slurm's logs need a shared filesystem: a run store elsewhere needs slurm_folder."""
        if self.backend == NAME and self.slurm_folder is None and not roots.is_local(root):
            return (
                "slurm_folder",
                f"the slurm backend writes its logs to a shared filesystem; the root {shown(root)} is not one, "
                "so set launcher.slurm_folder to a shared directory",
            )
        return super().root_problem(root)
