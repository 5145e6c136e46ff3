"""The run store on any fsspec URL: the sweep manifest and each stage's spec.json and status.json.

Layout: `<root>/<sweep>/manifest.json` and `<root>/<sweep>/<run-id>/<stage>/{spec.json,status.json,logs/,...}`.
Every path is built from checked names, so nothing derived from a spec can leave `<root>`.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from extrema import contract, lease, rundir
from extrema.contract import IN_FLIGHT, TERMINAL, Unreadable
from extrema.spec import RunSpec
from launch import roots

__all__ = ["IN_FLIGHT", "TERMINAL", "Unreadable"]

MANIFEST = "manifest.json"
UNREADABLE = "unreadable"  # the state shown for a stage whose status.json cannot be read (not a stage state)
STUCK_AFTER_S = 3600.0  # a submission recorded from another host without a job id for this long was interrupted
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")


def safe_name(name: str, what: str = "name") -> str:
    """`name` itself when it is a safe single path component; ValueError otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(
            f"{what} {name!r} is not allowed: use 1-100 letters, digits, '_', '.', '-' "
            "(no leading '.', no '..', no '/', no spaces or control characters)"
        )
    return name


def normalize_root(root: str) -> str:
    """The run-store root as a URL or an absolute local path, without a trailing '/'; ValueError naming the root
    and the reason for one that cannot be a run store (see launch.roots.normalized)."""
    return roots.normalized(root)


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
class StoredRun:
    """One run as the run store's manifest lists it: its id, its stages and the swept values that made it. What
    `status`, `results` and `plot` know of a run without its sweep file (`launch.sweep.Run` is the run with its
    validated experiment)."""

    run_id: str
    stages: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)

    def job_keys(self) -> list[str]:
        """The job keys of its stages."""
        return [job_key(self.run_id, s) for s in self.stages]


def read_manifest(sweep: str) -> dict[str, Any] | None:
    """The sweep's manifest, or None when the sweep was never submitted; Unreadable when it is damaged."""
    return contract.read_record(rundir.join(sweep, MANIFEST))


def stored_runs_of(url: str, manifest: dict[str, Any]) -> list[StoredRun]:
    """The runs a manifest lists; Unreadable (naming the manifest) when its run list is malformed."""
    try:
        return stored_runs(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise Unreadable(rundir.join(url, MANIFEST), f"malformed run list ({type(e).__name__}: {e})") from None


def stored_runs(manifest: dict[str, Any]) -> list[StoredRun]:
    """The runs listed by a manifest, in submission order."""
    return [
        StoredRun(safe_name(r["run_id"], "run id"), tuple(safe_name(s, "stage") for s in r["stages"]), r["overrides"])
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
    """Merge `manifest` into the stored one (atomic write) and return the result.

    A damaged stored manifest is kept beside as `manifest.json.damaged-<time>` and replaced by `manifest`.
    """
    url = rundir.join(sweep, MANIFEST)
    try:
        old = read_manifest(sweep)
    except Unreadable:
        fs, path = rundir.filesystem(url)
        fs.mv(path, f"{path}.damaged-{int(time.time())}")
        old = None
    out = merged_manifest(old, manifest)
    rundir.write_json(url, out)
    return out


def write_spec(stage: str, spec: RunSpec) -> None:
    """Write the RunSpec a stage executes as its `spec.json` (what `python -m extrema.entry` reads)."""
    rundir.write_json(rundir.join(stage, "spec.json"), spec.model_dump(mode="json"))


def damaged(url: str, reason: str) -> dict[str, Any]:
    """The status shown for a stage whose status.json cannot be read or whose directory leaves the store."""
    return {"state": UNREADABLE, "error": f"{url}: {reason}", UNREADABLE: True}


def read_status(stage: str) -> dict[str, Any]:
    """A stage's status.json: {} when absent, `damaged(...)` when it cannot be read."""
    try:
        return contract.read_status(stage)
    except Unreadable as e:
        return damaged(e.url, e.reason)


def submitter() -> dict[str, Any]:
    """Who records a submission: this host and process, so that an interrupted submission can be told apart."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": lease.process_start(pid)}


def mark_submitted(
    stage: str,
    backend: str,
    job_id: str | None,
    submitted_at: float | None = None,
    by: dict[str, Any] | None = None,
    code: str | None = None,
) -> dict[str, Any] | None:
    """Record a submission: state pending, the backend, its job id, the time, the submitter and the code snapshot.

    Not over a stage that a live attempt owns (its record says running; it is left as it is): returns None.
    """
    if lease.live_holder(stage) is not None:
        return None
    return contract.update_status(
        stage,
        state=contract.PENDING,
        backend=backend,
        job_id=job_id,
        submitted_at=submitted_at if submitted_at is not None else time.time(),
        submitted_by=by or submitter(),
        submitted_code=code,
        error=None,
        finished_at=None,
    )


def interrupted_submission(status: Mapping[str, Any], now: float | None = None) -> bool:
    """Whether a pending record without a job id was left by a submission that will never finish it.

    True when the submitting process (on this host) is gone, or, from another host, after STUCK_AFTER_S.
    """
    if status.get("state") != contract.PENDING or status.get("job_id"):
        return False
    by = status.get("submitted_by")
    if not isinstance(by, dict):
        return True  # written before submitters were recorded
    if by.get("host") == socket.gethostname() and isinstance(by.get("pid"), int):
        if by["pid"] == os.getpid():  # this process submitted it earlier and has moved on
            return True
        return not lease.process_alive(by["pid"], by.get("pid_start"))
    at = status.get("submitted_at")
    return not isinstance(at, (int, float)) or (now or time.time()) - at > STUCK_AFTER_S


def mark_ended(stage: str, state: str, error: str) -> dict[str, Any] | None:
    """Record that a stage ended as `state` unless it already reached a terminal state or a live attempt owns it;
    the new status or None."""
    if read_status(stage).get("state") in TERMINAL or lease.live_holder(stage) is not None:
        return None
    return contract.update_status(stage, state=state, error=error, finished_at=time.time())


def _read_local(path: str) -> Any:
    try:
        return contract.read_record(path)
    except Unreadable as e:
        return e


def read_many(urls: Sequence[str]) -> list[Any]:
    """Read many JSON-object records of one store: a dict, None when missing, an `Unreadable` when damaged.

    Local files are read directly, one after another (threads only add lock contention there); any other
    filesystem gets one batched `cat`, which async ones (s3, gcs, http) serve concurrently. Never raises for
    one bad file: it comes back as its `Unreadable`, naming the file and the reason.
    """
    if not urls:
        return []
    fs, _ = rundir.filesystem(urls[0])
    protocol = urls[0].split("://", 1)[0] if "://" in urls[0] else None
    if isinstance(fs, LocalFileSystem) or any((u.split("://", 1)[0] if "://" in u else None) != protocol for u in urls):
        return [_read_local(u) for u in urls]
    paths = [fs._strip_protocol(u) for u in urls]
    found = fs.cat(paths, on_error="return")
    out: list[Any] = []
    for u, p in zip(urls, paths):
        data = found.get(p)
        if isinstance(data, FileNotFoundError) or data is None:
            out.append(None)
        elif isinstance(data, OSError):
            out.append(Unreadable(u, contract.os_reason(data)))
        elif isinstance(data, BaseException):
            out.append(Unreadable(u, f"{type(data).__name__}: {data}"))
        else:
            try:
                out.append(contract.parse_record(u, data))
            except Unreadable as e:
                out.append(e)
    return out


def outside(sweep: str, stage: str) -> str | None:
    """Why a local stage directory leads outside its sweep (a symbolic link out), or None (also off local disks)."""
    fs, root = rundir.filesystem(sweep)
    if not isinstance(fs, LocalFileSystem):
        return None
    _, path = rundir.filesystem(stage)
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if real == real_root or real.startswith(real_root.rstrip("/") + "/"):
        return None
    return f"leads outside the run store (to {real}); refused"


def read_statuses(sweep: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """status.json of each job key ({} when absent; `damaged(...)` when unreadable or outside the store)."""
    keys = list(keys)
    stages = {k: stage_url(sweep, *split_key(k)) for k in keys}
    escapes = {k: why for k in keys if (why := outside(sweep, stages[k]))}
    wanted = [k for k in keys if k not in escapes]
    docs = read_many([rundir.join(stages[k], contract.STATUS) for k in wanted])
    out = {k: damaged(stages[k], why) for k, why in escapes.items()}
    for k, d in zip(wanted, docs):
        out[k] = damaged(d.url, d.reason) if isinstance(d, Unreadable) else d if isinstance(d, dict) else {}
    return {k: out[k] for k in keys}


def unreadable(statuses: Mapping[str, dict[str, Any]]) -> list[str]:
    """`path: reason` of every status that could not be read, in key order."""
    return [str(s["error"]) for s in statuses.values() if s.get(UNREADABLE)]


def log_files(stage: str) -> list[str]:
    """URLs of the files in a stage's `logs/` directory, sorted by name."""
    fs, path = rundir.filesystem(rundir.join(stage, "logs"))
    if not fs.exists(path):
        return []
    found = sorted(fs.find(path))
    return [fs.unstrip_protocol(p) for p in found] if "://" in stage else found
