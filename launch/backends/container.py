"""What a cluster job runs in, for the backends that start it on other machines (Slurm, Ray): `launcher.container`
(an image and how Slurm starts it) and `launcher.python` (the interpreter inside the job).

    launcher:
      backend: slurm
      container: {image: /shared/images/extrema.sqsh, runtime: pyxis, mounts: [/data]}
      python: python                    # the image's interpreter (the default with a container)

Without a container a job runs the submitter's own interpreter (`sys.executable`), which only works where every node
sees the same path; with one it runs `python` from the image's PATH unless `launcher.python` says otherwise. Every
value may reach a shell script (an sbatch script, a Ray entrypoint), so each is checked against a strict character
set here, at validation, and again where a backend renders it (`launch.backends.slurm.plan`).
"""

from __future__ import annotations

import re
import sys
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from launch.backends.base import LauncherSettings
from launch.inputs.printable import shown

# docker://registry#image:tag (pyxis), docker://registry/image:tag (apptainer, Ray), /shared/images/x.sqsh|.sif
IMAGE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/@#+=-]{0,511}|/[A-Za-z0-9_.:/@#+=-]{1,511}")
IMAGE_ALLOWED = "letters, digits and _ . : / @ # + = - (a registry reference or an absolute path; no '..')"
# An absolute path without ',' or ':' (they separate mounts and their source from their target), no '..'.
MOUNT_PATH = re.compile(r"/[A-Za-z0-9_.@%+=/-]{0,1023}")
MOUNT_ALLOWED = "an absolute path (letters, digits and _ . @ % + = / -; no ',' ':' or '..'), or SOURCE:TARGET"
PYTHON = re.compile(r"[A-Za-z0-9_./+-]{1,1024}")
PYTHON_ALLOWED = "a command name or an absolute path (letters, digits and _ . / + -)"


def image_problem(image: str) -> str | None:
    """Why an image reference cannot go into a job script; None when it can."""
    if not IMAGE.fullmatch(image) or ".." in image:
        return f"{shown(image)} cannot go into a job script; allowed: {IMAGE_ALLOWED}"
    return None


def mount_path_problem(path: str) -> str | None:
    """Why a path cannot be mounted into a container by a job script; None when it can."""
    if not MOUNT_PATH.fullmatch(path) or ".." in path.split("/"):
        return f"{shown(path)} cannot be mounted by a job script; allowed: {MOUNT_ALLOWED}"
    return None


def mount_pair(mount: str) -> tuple[str, str]:
    """A mount `PATH` or `SOURCE:TARGET` as (source, target); ValueError when either cannot go into a script."""
    source, _, target = mount.partition(":")
    for path in (source, target or source):
        reason = mount_path_problem(path)
        if reason:
            raise ValueError(reason)
    return source, target or source


def python_problem(python: str) -> str | None:
    """Why an interpreter cannot be the job's command; None when it can."""
    if not PYTHON.fullmatch(python) or python.startswith("-") or ".." in python.split("/"):
        return f"{shown(python)} cannot be a job's interpreter; allowed: {PYTHON_ALLOWED}"
    return None


class ContainerSpec(BaseModel):
    """`launcher.container`: the image every task runs in. On Slurm, `runtime` says how: `pyxis` (srun's
    --container-image/--container-mounts) or `apptainer` (`apptainer exec --bind ... IMAGE python ...`, with --nv on
    GPU jobs); the sweep's log folder (submitit's pickles and the code snapshot) and a run store on a local path are
    mounted, at the same path, besides `mounts`. On Ray the image is the job's `image_uri` (podman on every node)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str = Field(description="image reference or path: docker://..., /shared/images/extrema.sqsh or .sif")
    runtime: Literal["pyxis", "apptainer"] = Field("pyxis", description="slurm backend: how srun starts the image")
    mounts: tuple[str, ...] = Field((), description="more host paths to mount: PATH or SOURCE:TARGET")

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        reason = image_problem(value)
        if reason:
            raise ValueError(reason)
        return value

    @field_validator("mounts")
    @classmethod
    def _mounts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for mount in value:
            mount_pair(mount)
        return value


class ContainerSettings(LauncherSettings):
    """`launcher.container` and `launcher.python`: what the cluster backends' jobs run in (see the module)."""

    container: ContainerSpec | None = Field(None, description="slurm, ray backends: the image every job runs in")
    python: str | None = Field(
        None, description="slurm, ray backends: interpreter inside the job; the submitter's, or `python` in a container"
    )

    @field_validator("python")
    @classmethod
    def _python(cls, value: str | None) -> str | None:
        reason = None if value is None else python_problem(value)
        if reason:
            raise ValueError(reason)
        return value

    def job_python(self) -> str:
        """The interpreter a job runs: launcher.python, else `python` in a container, else the submitter's own."""
        return self.python or ("python" if self.container else sys.executable)
