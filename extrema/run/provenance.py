"""Where a result came from: code identity, git state, environment, packages, hosts and ranks. Torch-free."""

from __future__ import annotations

import os
import socket
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from extrema.run import code_snapshot, contract, environment

PROVENANCE_PACKAGES = (
    "extrema-ssl",
    "torch",
    "torchvision",
    "numpy",
    "pydantic",
    "fsspec",
    "pyarrow",
    "submitit",
    "ray",
)


def git_state(repo: Path | None = None) -> dict[str, Any]:
    """Git sha and dirty flag of the source tree; outside a checkout, EXTREMA_GIT_SHA (set by the image) or nulls."""
    cwd = repo or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
        )
        return {"git_sha": sha, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": os.environ.get("EXTREMA_GIT_SHA"), "git_dirty": None}


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that change results."""
    out: dict[str, str | None] = {}
    for name in PROVENANCE_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(world_size: int, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything needed to say where a result came from; `ranks`: every rank's {"rank", "host", "pid"}."""
    ranks = ranks or [contract.this_process()]
    ident = code_snapshot.identity()
    return {
        **(git_state() if ident["code"] is None else {}),
        **environment.describe(),
        **ident,
        "packages": package_versions(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "world_size": world_size,
        "hosts": list(dict.fromkeys(str(r["host"]) for r in ranks)),
        "ranks": ranks,
    }
