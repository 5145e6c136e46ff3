"""The view of a blocking sweep (local backend, or a Ray head started for it) while its stages run.

On a terminal: one live bar per running stage with step/total, loss and ETA. Elsewhere (a pipe, a log file,
nohup) plain lines: one per running stage every `every_s` seconds (step/total, loss, images/s, ETA) and one at each
state change; `quiet`: only the stages that end; `json`: the same events as one JSON object per line, for scripts.
The numbers come from each stage's `metrics.jsonl` (records with "step", "total_steps", "loss", "images_per_s"),
so the view shows what the stage itself wrote, whichever process runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, Annotated, Any, Literal

from pydantic import Field, ValidationError
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

from extrema.run import contract, metrics_log, rundir
from extrema.run.contract import StageDir
from launch.backends.base import Backend, Job, State

ENDED = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED})
TAIL_BYTES = 256 << 10  # the end of metrics.jsonl read for the newest progress


class ProgressRecord(contract.Record):
    """The fields of a metrics.jsonl record the progress view reads; a record with any of them wrong is skipped."""

    step: contract.Count | None = None
    total_steps: Annotated[int, Field(ge=1, le=1 << 40)] | None = None
    loss: Annotated[float, Field(allow_inf_nan=False)] | None = None
    images_per_s: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


def latest_progress(stage_dir: str, tree: str | None = None) -> dict[str, Any]:
    """The newest step, total_steps, loss and images/s a stage logged, from the end of its metrics.jsonl (empty
    before its first line, or when the file cannot be read or, with `tree`, leads outside that directory)."""
    try:
        records = metrics_log.read_tail(StageDir(stage_dir).metrics, TAIL_BYTES, tree)
    except contract.Unreadable:
        return {}
    out: dict[str, Any] = {}
    for record in records:
        try:
            ProgressRecord.model_validate(record)
        except ValidationError:
            continue
        if "total_steps" in record:
            out.update(step=record.get("step"), total_steps=record["total_steps"])
        if "loss" in record:
            out["loss"] = record["loss"]
        if "images_per_s" in record:
            out["images_per_s"] = record["images_per_s"]
    return out


def _info(p: Mapping[str, Any]) -> str:
    return f"loss {p['loss']:.4f}" if isinstance(p.get("loss"), (int, float)) else ""


Mode = Literal["auto", "live", "lines", "quiet", "json"]


@dataclass(frozen=True)
class Watch:
    """How a blocking sweep shows progress: `auto` is `live` on a terminal and `lines` elsewhere."""

    mode: Mode = "auto"
    every_s: float = 30.0  # lines and json: seconds between the progress reports of a running stage
    events: IO[str] | None = None  # json: where the events go (standard output by default)


def follow(
    backend: Backend,
    ids: Mapping[str, str],
    jobs: Mapping[str, Job],
    console: Console,
    interval: float = 0.5,
    watch: Watch | None = None,
) -> dict[str, State]:
    """Poll the backend until every job in `ids` (key -> job id) has ended; returns the final states by key."""
    watch = watch or Watch()
    mode = watch.mode if watch.mode != "auto" else ("live" if console.is_terminal else "lines")
    if mode == "live":
        return follow_live(backend, ids, jobs, console, interval)
    if mode == "json":
        import sys

        stream = watch.events or sys.stdout

        def emit(event: dict[str, Any]) -> None:
            stream.write(rundir.dumps(event, sort_keys=True) + "\n")
            stream.flush()

        return follow_plain(backend, ids, jobs, emit, interval, watch.every_s)
    return follow_plain(backend, ids, jobs, lambda e: print_event(console, e, mode == "quiet"), interval, watch.every_s)


def print_event(console: Console, event: dict[str, Any], quiet: bool) -> None:
    """One plain line for an event (quiet: only the stages that end)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
    if event["event"] == "state":
        if quiet and event["state"] not in {s.value for s in ENDED}:
            return
        took = f"  ({event['elapsed_s']:.1f} s)" if event.get("elapsed_s") is not None else ""
        console.print(f"{stamp}  {event['state']:>9}  {event['key']}{took}", markup=False, highlight=False)
    elif event["event"] == "progress" and not quiet:
        parts = [f"step {event['step']}/{event['total_steps']}"]
        if isinstance(event.get("loss"), (int, float)):
            parts.append(f"loss {event['loss']:.4f}")
        if isinstance(event.get("images_per_s"), (int, float)):
            parts.append(f"{event['images_per_s']:.0f} img/s")
        if isinstance(event.get("eta_s"), (int, float)):
            parts.append("eta " + time.strftime("%H:%M:%S", time.gmtime(event["eta_s"])))
        line = f"{stamp}  {State.RUNNING.value:>9}  {event['key']}  {'  '.join(parts)}"
        console.print(line, markup=False, highlight=False)
    elif event["event"] == "done":
        counts = ", ".join(f"{n} {state}" for state, n in sorted(event["counts"].items()))
        console.print(f"{stamp}  all {event['stages']} stages have ended: {counts}", markup=False, highlight=False)


@dataclass
class _Seen:
    state: str | None = None
    since: float | None = None  # when this process first saw the stage running
    first_step: tuple[float, int] | None = None  # (time, step) of the first progress seen
    reported: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def eta_s(seen: _Seen, now: float, step: int, total: int) -> float | None:
    """Seconds left at the rate observed since this process first saw the stage's progress."""
    if seen.first_step is None or step <= seen.first_step[1]:
        return None
    rate = (step - seen.first_step[1]) / max(now - seen.first_step[0], 1e-9)
    return max(0.0, (total - step) / rate)


def follow_plain(
    backend: Backend,
    ids: Mapping[str, str],
    jobs: Mapping[str, Job],
    emit: Callable[[dict[str, Any]], None],
    interval: float,
    every_s: float,
) -> dict[str, State]:
    """Poll until every job has ended, emitting an event at each state change and, every `every_s` seconds, one
    with the progress of each running stage."""
    seen = {key: _Seen() for key in ids}
    while True:
        now_states = backend.status(list(ids.values()))
        states = {key: now_states.get(job_id, State.UNKNOWN) for key, job_id in ids.items()}
        now = time.time()
        for key, state in states.items():
            s = seen[key]
            if state == State.RUNNING and s.since is None:
                s.since = now
            if state.value != s.state:
                s.state = state.value
                took = now - s.since if state in ENDED and s.since is not None else None
                emit({"event": "state", "time": now, "key": key, "state": state.value, "elapsed_s": took})
            if state != State.RUNNING:
                continue
            p = latest_progress(rundir.join(jobs[key].run_dir, jobs[key].stage))
            if not p.get("total_steps") or p.get("step") is None:
                continue
            if s.first_step is None:
                s.first_step = (now, int(p["step"]))
            if now - s.reported >= every_s:
                s.reported = now
                emit({"event": "progress", "time": now, "key": key, "step": p["step"], "total_steps": p["total_steps"],
                      "loss": p.get("loss"), "images_per_s": p.get("images_per_s"),
                      "eta_s": eta_s(s, now, int(p["step"]), int(p["total_steps"]))})  # fmt: skip
        if all(s in ENDED for s in states.values()):
            counts: dict[str, int] = {}
            for state in states.values():
                counts[state.value] = counts.get(state.value, 0) + 1
            emit({"event": "done", "time": time.time(), "stages": len(states), "counts": counts})
            return states
        time.sleep(interval)


def follow_live(
    backend: Backend, ids: Mapping[str, str], jobs: Mapping[str, Job], console: Console, interval: float
) -> dict[str, State]:
    """The live bars on a terminal, until every job has ended."""
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
