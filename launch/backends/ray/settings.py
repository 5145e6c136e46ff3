"""The Ray backend's own launcher settings: the cluster's address; and (from `launch.backends.container`) the image
(`image_uri`) and interpreter its jobs run."""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from launch.backends.container import ContainerSettings
from launch.inputs.printable import no_control, shown

_RAY_ADDRESS = re.compile(r"(?:[a-z][a-z0-9+.-]*://)?[A-Za-z0-9_.:@%/\[\]-]{1,255}")


class RaySettings(ContainerSettings):
    """`launcher.ray_address`: the cluster jobs go to (else RAY_ADDRESS; with neither, a local head for the sweep)."""

    ray_address: str | None = Field(None, description="ray backend: cluster address; a local Ray when unset")

    @field_validator("ray_address")
    @classmethod
    def _ray_address(cls, value: str | None) -> str | None:
        no_control(value)
        if value is not None and not _RAY_ADDRESS.fullmatch(value):
            raise ValueError(
                f"{shown(value)} is not a Ray address (host:port, ray://host:port, http://host:port, auto)"
            )
        return value
