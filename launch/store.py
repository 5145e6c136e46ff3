"""The run store on any fsspec URL: the sweep manifest and each stage's spec.json and status.json.

Layout: `<root>/<sweep>/manifest.json` and `<root>/<sweep>/<run-id>/<stage>/{spec.json,status.json,logs/,...}`.
Every path is built from checked names, so nothing derived from a spec can leave `<root>`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from extrema import rundir
from extrema.entry import update_status
from extrema.spec import RunSpec

MANIFEST = "manifest.json"
TERMINAL = frozenset({"completed", "failed", "cancelled"})
IN_FLIGHT = frozenset({"pending", "running", "preempted"})  # preempted: stopped at a signal, to be requeued
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def safe_name(name: str, what: str = "name") -> str:
    """`name` itself when it is a safe single path component; ValueError otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} is not allowed: use 1-100 letters, digits, '_', '.', '-' "
            "(no leading '.', no '..', no '/', no spaces or control characters)"
        )
    return name


def normalize_root(root: str) -> str:
    """The run-store root as a URL or an absolute local path, without a trailing '/'."""
    if not root or _CONTROL.search(root):
        raise ValueError(f"root {root!r} is empty or contains control characters")
    if "://" not in root:
        root = os.path.abspath(os.path.expanduser(root))
    return root.rstrip("/") or "/"


def sweep_url(root: str, sweep: str) -> str:
    """`<root>/<sweep>`."""
    return rundir.join(normalize_root(root), safe_name(sweep, "sweep name"))


def run_url(sweep: str, run_id: str) -> str:
    """`<sweep-url>/<run-id>`."""
    return rundir.join(sweep, safe_name(run_id, "run id"))


def stage_url(sweep: str, run_id: str, stage: str) -> str:
    """`<sweep-url>/<run-id>/<stage>`."""
    return rundir.join(run_url(sweep, run_id), safe_name(stage, "stage"))


def job_key(run_id: str, stage: str) -> str:
    """The key of one stage job: `<run-id>/<stage>`."""
    return f"{safe_name(run_id, 'run id')}/{safe_name(stage, 'stage')}"


def split_key(key: str) -> tuple[str, str]:
    """(run id, stage) of a job key."""
    run_id, _, stage = key.partition("/")
    return safe_name(run_id, "run id"), safe_name(stage, "stage")


@dataclass(frozen=True)
class RunEntry:
    """One run of a sweep as the store lists it: its id, its stages and the swept values that made it."""

    run_id: str
    stages: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)

    def job_keys(self) -> list[str]:
        """The job keys of its stages."""
        return [job_key(self.run_id, s) for s in self.stages]


def read_manifest(sweep: str) -> dict[str, Any] | None:
    """The sweep's manifest, or None when the sweep was never submitted."""
    manifest = rundir.read_json(rundir.join(sweep, MANIFEST))
    return manifest if isinstance(manifest, dict) else None


def entries(manifest: dict[str, Any]) -> list[RunEntry]:
    """The runs listed by a manifest, in submission order."""
    return [
        RunEntry(safe_name(r["run_id"], "run id"), tuple(safe_name(s, "stage") for s in r["stages"]), r["overrides"])
        for r in manifest.get("runs", [])
    ]


def merged_manifest(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """`new` on top of `old`: runs keep their first-seen order, job records accumulate."""
    if not old:
        return new
    runs = {r["run_id"]: r for r in old.get("runs", [])}
    runs.update({r["run_id"]: r for r in new.get("runs", [])})
    return {
        **old,
        **new,
        "runs": list(runs.values()),
        "jobs": {**old.get("jobs", {}), **new.get("jobs", {})},
        "created_at": old.get("created_at", new.get("created_at")),
    }


def write_manifest(sweep: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Merge `manifest` into the stored one (atomic write) and return the result."""
    out = merged_manifest(read_manifest(sweep), manifest)
    rundir.write_json(rundir.join(sweep, MANIFEST), out)
    return out


def write_spec(sweep: str, spec: RunSpec) -> str:
    """Write `<stage>/spec.json` of a run and return the stage URL."""
    url = stage_url(sweep, spec.run_id, spec.stage)
    rundir.write_json(rundir.join(url, "spec.json"), spec.model_dump(mode="json"))
    return url


def read_status(stage: str) -> dict[str, Any]:
    """A stage's status.json, {} when absent."""
    status = rundir.read_json(rundir.join(stage, "status.json"))
    return status if isinstance(status, dict) else {}


def set_status(stage: str, **fields: Any) -> dict[str, Any]:
    """Merge fields into a stage's status.json (atomic write)."""
    return update_status(stage, **fields)


def mark_submitted(stage: str, backend: str, job_id: str | None, submitted_at: float | None = None) -> dict[str, Any]:
    """Record a submission: state pending, the backend, its job id and the time."""
    return set_status(
        stage,
        state="pending",
        backend=backend,
        job_id=job_id,
        submitted_at=submitted_at if submitted_at is not None else time.time(),
        error=None,
        finished_at=None,
    )


def mark_ended(stage: str, state: str, error: str) -> dict[str, Any] | None:
    """Record that a stage ended as `state` unless it already reached a terminal state; the new status or None."""
    if read_status(stage).get("state") in TERMINAL:
        return None
    return set_status(stage, state=state, error=error, finished_at=time.time())


def _read_local(path: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def read_many(urls: Sequence[str]) -> list[Any]:
    """Read many JSON documents of one store; None for missing ones.

    Local files are read directly, one after another (threads only add lock contention there); any other
    filesystem gets one batched `cat`, which async ones (s3, gcs, http) serve concurrently.
    """
    if not urls:
        return []
    fs, _ = rundir.filesystem(urls[0])
    protocol = urls[0].split("://", 1)[0] if "://" in urls[0] else None
    if any((u.split("://", 1)[0] if "://" in u else None) != protocol for u in urls):
        return [rundir.read_json(u) for u in urls]  # mixed stores: one at a time
    if isinstance(fs, LocalFileSystem):
        return [_read_local(u.removeprefix("file://")) for u in urls]
    paths = [fs._strip_protocol(u) for u in urls]
    found = fs.cat(paths, on_error="return")
    out: list[Any] = []
    for p in paths:
        data = found.get(p)
        if isinstance(data, FileNotFoundError) or data is None:
            out.append(None)
        elif isinstance(data, BaseException):
            raise data
        else:
            out.append(json.loads(data))
    return out


def read_statuses(sweep: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """status.json of each job key ({} when absent)."""
    keys = list(keys)
    docs = read_many([rundir.join(stage_url(sweep, *split_key(k)), "status.json") for k in keys])
    return {k: d if isinstance(d, dict) else {} for k, d in zip(keys, docs)}


def log_files(stage: str) -> list[str]:
    """URLs of the files in a stage's `logs/` directory, sorted by name."""
    fs, path = rundir.filesystem(rundir.join(stage, "logs"))
    if not fs.exists(path):
        return []
    found = sorted(fs.find(path))
    return [fs.unstrip_protocol(p) for p in found] if "://" in stage else found
