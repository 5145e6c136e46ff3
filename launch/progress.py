"""The live view of a blocking (local) sweep: one bar per running stage with step/total, loss and ETA.

The numbers come from each stage's `metrics.jsonl` (records with "step", "total_steps", "loss"), so the view
shows what the stage itself wrote, whichever process runs it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from extrema import rundir
from launch.backends.base import Backend, Job, State

ENDED = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})


def latest_progress(stage_dir: str) -> dict[str, Any]:
    """The newest step, total_steps and loss a stage logged (empty before its first log line)."""
    out: dict[str, Any] = {}
    for record in rundir.read_jsonl(rundir.join(stage_dir, "metrics.jsonl")):
        if "total_steps" in record:
            out.update(step=record.get("step"), total_steps=record["total_steps"])
        if "loss" in record:
            out["loss"] = record["loss"]
    return out


def _info(p: Mapping[str, Any]) -> str:
    return f"loss {p['loss']:.4f}" if isinstance(p.get("loss"), (int, float)) else ""


def follow(
    backend: Backend, ids: Mapping[str, str], jobs: Mapping[str, Job], console: Console, interval: float = 0.5
) -> dict[str, State]:
    """Poll the backend until every job in `ids` (key -> job id) has ended; returns the final states by key."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )
    states: dict[str, State] = {}
    bars: dict[str, TaskID] = {}
    started: dict[str, float] = {}
    reported: set[str] = set()
    with Progress(*columns, console=console, transient=False) as progress:
        overall = progress.add_task("stages done", total=len(ids), info="")
        while True:
            now = backend.status(list(ids.values()))
            states = {key: now.get(job_id, State.UNKNOWN) for key, job_id in ids.items()}
            for key, state in states.items():
                stage_dir = rundir.join(jobs[key].run_dir, jobs[key].stage)
                if state == State.RUNNING:
                    started.setdefault(key, time.time())
                    if key not in bars:
                        bars[key] = progress.add_task(key, total=None, info="starting")
                    p = latest_progress(stage_dir)
                    if p.get("total_steps"):
                        progress.update(bars[key], total=p["total_steps"], completed=p.get("step") or 0, info=_info(p))
                elif state in ENDED and key not in reported:
                    reported.add(key)
                    if key in bars:
                        progress.remove_task(bars.pop(key))
                    took = f"  ({time.time() - started[key]:.1f} s)" if key in started else "  (not run)"
                    style = "green" if state == State.COMPLETED else "red"
                    progress.console.print(Text(f"{state.value:>9}  {key}{took}", style=style))
            done = sum(s in ENDED for s in states.values())
            progress.update(overall, completed=done)
            if done == len(ids):
                return states
            time.sleep(interval)
