"""What the Slurm and Ray backend tests share: one-step stage settings, the final states, and the CLI in-process."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from launch.backends.base import State
from launch.cli import main

FAST: dict[str, Any] = {"pretrain": {"steps": 1, "batch_size": 8, "ckpt_every": 1}, "data": {"synthetic_size": 32}}
FAST_KNN: dict[str, Any] = {**FAST, "knn": {"bank_size": 32, "val_size": 16, "k": 5, "batch_size": 32}}
FINAL = {State.COMPLETED, State.FAILED, State.CANCELLED}
TINY = Path(__file__).resolve().parent.parent / "jobs" / "tiny.yaml"


def cli(*args: str) -> tuple[int, str]:
    """Run the CLI in this process; (exit code, stdout and stderr)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(list(args))
    return code, out.getvalue()


def release_requeued(run: Callable[..., Any], job_id: str) -> None:
    """Let a requeued Slurm job start in 3 s instead of after Slurm's two-minute hold. Not at once: a job started
    within a second of its requeue is killed as "non-startable" (its previous incarnation's credential was revoked
    in that second), and ends FAILED."""
    run("scontrol", "update", f"JobId={job_id}", "StartTime=now+3")
