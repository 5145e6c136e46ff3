"""The run store on any fsspec URL: the sweep manifest and each stage's spec.json and status.json.

Layout: `<root>/<sweep>/manifest.json` (the sweep, its launcher and the names of its parts),
`<root>/<sweep>/manifest/runs-<digest>.json` (its runs and job records, RUNS_PER_PART at a time, so no record grows
with the sweep) and `<root>/<sweep>/<run-id>/<stage>/{spec.json,status.json,logs/,...}`.

Every path is built from checked names, so nothing derived from a spec can leave `<root>`; and nothing read from a
local store leads outside its sweep: a file or directory on the way that is a symbolic link out is refused
(`Tree.leaves`, and `contract.read_bytes` checks the file it actually opened). Records are read through
`read_many` / `read_manifest`: typed, bounded, each problem an `Unreadable` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

from fsspec.implementations.local import LocalFileSystem
from pydantic import AfterValidator, Field

from extrema.run import contract, lease, rundir
from extrema.run.contract import StageDir, StageState, Unreadable
from extrema.spec import RunSpec
from launch.runstore import roots

__all__ = ["Unreadable"]

MANIFEST = "manifest.json"
PARTS = "manifest"  # `<sweep>/manifest/runs-<digest>.json`: the manifest's runs and job records, a part at a time
RUNS_PER_PART = 1000
PART_BYTES = 512 << 10  # a part is split in two while its text is larger than this (down to one run)
MAX_PART_BYTES = 8 << 20  # one run's swept values come from a sweep file of at most 1 MiB (launch.inputs.yamlfile)
MAX_MANIFEST_BYTES = 128 << 20  # manifest.json of the kind written before parts: every run inline (~0.5 kB each)
PART_GRACE_S = 3600.0  # a part no index lists is removed once it is this old (a concurrent sweep's are younger)
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
    and the reason for one that cannot be a run store (see launch.runstore.roots.normalized)."""
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
    `status`, `results` and `plot` know of a run without its sweep file (`launch.sweepfile.model.Run` is the run
    with its validated experiment)."""

    run_id: str
    stages: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)

    def job_keys(self) -> list[str]:
        """The job keys of its stages."""
        return [job_key(self.run_id, s) for s in self.stages]


def _name(value: str) -> str:
    if not _NAME.fullmatch(value) or ".." in value:
        raise ValueError("not a safe name (1-100 letters, digits, '_', '.', '-'; no leading '.', no '..')")
    return value


def _part_name(value: str) -> str:
    if not re.fullmatch(r"runs-[0-9a-f]{16}\.json", value):
        raise ValueError("not the name of a manifest part")
    return value


Name = Annotated[str, AfterValidator(_name)]
PartName = Annotated[str, AfterValidator(_part_name)]


class RunEntry(contract.Record):
    """One run of the manifest (`StoredRun`)."""

    run_id: Name
    stages: list[Name]
    overrides: dict[str, Any] = Field(default_factory=dict)


class JobEntry(contract.Record):
    """The job a submission sent for one stage."""

    job_id: str | None = None
    backend: str | None = None
    cluster: str | None = None
    submitted_at: contract.Seconds | None = None


class ManifestPart(contract.Record):
    """`manifest/runs-<digest>.json`: some of the sweep's runs and their job records."""

    runs: list[RunEntry] = Field(default_factory=list)
    jobs: dict[str, JobEntry] = Field(default_factory=dict)


class Manifest(ManifestPart):
    """`manifest.json`: the sweep, its launcher and the names of its parts (older stores: every run inline)."""

    sweep: str | None = None
    root: str | None = None
    source: str | None = None
    backend: str | None = None
    log_dir: str | None = None
    launcher: dict[str, Any] | None = None
    code: dict[str, Any] | None = None
    created_at: contract.Seconds | None = None
    submitted_at: contract.Seconds | None = None
    parts: list[PartName] | None = None


@dataclass(frozen=True)
class Tree:
    """A sweep's directory on this machine: its URL, its path and its real path (links resolved)."""

    url: str
    path: str
    real: str

    def path_of(self, url: str) -> str:
        """The local path of a URL of the sweep (cheap for URLs joined onto its own)."""
        if url.startswith(self.url + "/"):
            return self.path + url[len(self.url) :]
        return str(rundir.filesystem(url)[1])

    def leaves(self, url: str) -> bool:
        """Whether a directory or file of the sweep leads outside it (a symbolic link out): one lstat per level
        below the sweep, the path resolved only past a link."""
        path = self.path_of(url)
        here = self.path
        if not path.startswith(here + "/"):
            return not contract.within(os.path.realpath(path), self.real)
        for part in path[len(here) + 1 :].split("/"):
            here = f"{here}/{part}"
            try:
                linked = stat.S_ISLNK(os.lstat(here).st_mode)
            except OSError:
                return False  # nothing there yet (or not a directory): nothing leads anywhere
            if linked:
                return not contract.within(os.path.realpath(path), self.real)
        return False


def local_tree(sweep: str) -> Tree | None:
    """The sweep's directory when it is on this machine's filesystem, else None."""
    fs, path = rundir.filesystem(sweep)
    if not isinstance(fs, LocalFileSystem):
        return None
    path = str(path).rstrip("/")
    return Tree(sweep.rstrip("/"), path, os.path.realpath(path))


def real_tree(url: str) -> str | None:
    """The real path (links resolved) of a local directory of the store; None off local disks."""
    tree = local_tree(url)
    return tree.real if tree is not None else None


def has_manifest(sweep: str) -> bool:
    """Whether the sweep was submitted: its manifest's index is there (its parts are not read); Unreadable (naming
    the file) when the index is damaged or leads outside."""
    return (
        contract.read_record(rundir.join(sweep, MANIFEST), MAX_MANIFEST_BYTES, real_tree(sweep), Manifest) is not None
    )


def read_manifest(sweep: str) -> dict[str, Any] | None:
    """The sweep's manifest with every run and job record of its parts, or None when the sweep was never
    submitted; Unreadable (naming the file) when the index or a part is damaged, missing or leads outside."""
    url = rundir.join(sweep, MANIFEST)
    tree = real_tree(sweep)
    index = contract.read_record(url, MAX_MANIFEST_BYTES, tree, Manifest)
    if index is None:
        return None
    names = index.pop("parts", None)
    if names is None:  # written before parts: runs and jobs inline
        return {**index, "runs": index.get("runs", []), "jobs": index.get("jobs", {})}
    urls = [rundir.join(sweep, PARTS, n) for n in names]
    runs: list[dict[str, Any]] = []
    jobs: dict[str, Any] = {}
    for part_url, doc in zip(urls, read_many(sweep, urls, MAX_PART_BYTES, ManifestPart)):
        if isinstance(doc, Unreadable):
            raise doc
        if doc is None:
            raise Unreadable(part_url, f"missing, though {MANIFEST} lists it")
        runs += doc.get("runs", [])
        jobs.update(doc.get("jobs", {}))
    return {**index, "runs": runs, "jobs": jobs}


def stored_runs_of(url: str, manifest: dict[str, Any]) -> list[StoredRun]:
    """The runs a manifest lists; Unreadable (naming the manifest) when its run list is malformed."""
    try:
        return stored_runs(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise Unreadable(rundir.join(url, MANIFEST), f"malformed run list ({type(e).__name__})") from None


def stored_runs(manifest: dict[str, Any]) -> list[StoredRun]:
    """The runs listed by a manifest, in submission order."""
    return [
        StoredRun(safe_name(r["run_id"], "run id"), tuple(safe_name(s, "stage") for s in r["stages"]), r["overrides"])
        for r in manifest.get("runs", [])
    ]


def merged_manifest(old: dict[str, Any] | None, new: dict[str, Any]) -> dict[str, Any]:
    """`new` on top of `old`: runs keep their first-seen order, job records accumulate."""
    old = old or {}
    runs = {r["run_id"]: r for r in old.get("runs", [])}
    runs.update({r["run_id"]: r for r in new.get("runs", [])})
    return {
        **old,
        **new,
        "runs": list(runs.values()),
        "jobs": {**old.get("jobs", {}), **new.get("jobs", {})},
        "created_at": old.get("created_at", new.get("created_at")),
    }


def manifest_parts(runs: list[dict[str, Any]], jobs: dict[str, Any]) -> dict[str, str]:
    """The parts of a manifest, name -> text: runs in order, RUNS_PER_PART at a time, each with its job records
    (records of runs no longer listed go with the first), halved while a part is larger than PART_BYTES."""
    by_run: dict[str, dict[str, Any]] = {}
    for key, job in jobs.items():
        by_run.setdefault(key.partition("/")[0], {})[key] = job
    listed = {r["run_id"] for r in runs}
    stray = {k: j for run_id, js in by_run.items() if run_id not in listed for k, j in js.items()}
    todo = [runs[i : i + RUNS_PER_PART] for i in range(0, len(runs), RUNS_PER_PART)] or [[]]
    out: dict[str, str] = {}
    while todo:
        chunk = todo.pop(0)
        own = {k: j for r in chunk for k, j in by_run.get(r["run_id"], {}).items()}
        if not out:
            own.update(stray)
        text = json.dumps({"runs": chunk, "jobs": own}, sort_keys=True, separators=(",", ":"), default=str)
        if len(text) > PART_BYTES and len(chunk) > 1:
            half = len(chunk) // 2
            todo[:0] = [chunk[:half], chunk[half:]]
            continue
        out[f"runs-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"] = text
    return out


def sweep_manifest(
    sweep: str, root: str, source: str, launcher: dict[str, Any], log_dir: str, runs: Sequence[StoredRun]
) -> dict[str, Any]:
    """The manifest a submission writes: the sweep, its file, its launcher settings (a model dump) and backend, the
    backend's log folder and the runs (`write_manifest` splits them into parts)."""
    return {
        "sweep": sweep,
        "root": normalize_root(root),
        "source": source,
        "backend": launcher["backend"],
        "launcher": launcher,
        "log_dir": log_dir,
        "runs": [{"run_id": r.run_id, "stages": list(r.stages), "overrides": r.overrides} for r in runs],
        "created_at": time.time(),
    }


def write_manifest(sweep: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """Merge `manifest` into the stored one and return the result: its parts first, then `manifest.json` naming
    them (atomic), then parts no index lists that are older than PART_GRACE_S are removed.

    A damaged stored manifest (index or part) is kept beside as `<name>.damaged-<time>` and replaced by `manifest`;
    one refused for its size alone is left where it is and Unreadable is raised.
    """
    url = rundir.join(sweep, MANIFEST)
    try:
        old = read_manifest(sweep)
    except Unreadable as e:
        if e.oversize:
            raise
        contract.set_aside(e.url)
        old = None
    out = merged_manifest(old, manifest)
    parts = manifest_parts(out["runs"], out["jobs"])
    for name, text in parts.items():  # every part rewritten: a concurrent sweep's clean-up sees it young
        rundir.write_text_atomic(rundir.join(sweep, PARTS, name), text)
    index = {k: v for k, v in out.items() if k not in ("runs", "jobs")}
    rundir.write_json(url, {**index, "parts": list(parts)})
    _remove_old_parts(sweep, set(parts))
    return out


def _remove_old_parts(sweep: str, keep: set[str]) -> None:
    fs, path = rundir.filesystem(rundir.join(sweep, PARTS))
    with contextlib.suppress(OSError, NotImplementedError, ValueError):
        for found in fs.ls(path, detail=False):
            name = str(found).rstrip("/").rsplit("/", 1)[-1]
            if name.startswith("runs-") and name not in keep and time.time() - _modified(fs, found) > PART_GRACE_S:
                fs.rm_file(found)


def _modified(fs: Any, path: str) -> float:
    """When a file was last written (seconds since the epoch); now when the filesystem does not say."""
    try:
        return float(fs.modified(path).timestamp())
    except (NotImplementedError, OSError, AttributeError, TypeError, ValueError):
        return time.time()


def write_spec(stage: str, spec: RunSpec) -> None:
    """Write the RunSpec a stage executes as its `spec.json` (what `python -m extrema.entry` reads)."""
    rundir.write_json(StageDir(stage).spec, spec.model_dump(mode="json"))


def damaged(url: str, reason: str) -> dict[str, Any]:
    """The status shown for a stage whose status.json cannot be read or whose directory leaves the store."""
    return {"state": UNREADABLE, "error": f"{url}: {reason}", UNREADABLE: True}


def sweep_of(stage: str) -> str:
    """The sweep URL of a stage URL `<sweep>/<run-id>/<stage>`."""
    return stage.rstrip("/").rsplit("/", 2)[0]


def read_status(stage: str) -> dict[str, Any]:
    """A stage's status.json: {} when absent, `damaged(...)` when it cannot be read or leads outside its sweep."""
    (doc,) = read_many(sweep_of(stage), [StageDir(stage).status])
    return damaged(doc.url, doc.reason) if isinstance(doc, Unreadable) else doc or {}


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
        state=StageState.PENDING,
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
    if status.get("state") != StageState.PENDING or status.get("job_id"):
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


def record_ended(stage: str, state: StageState, error: str, **fields: Any) -> dict[str, Any] | None:
    """Record that a stage ended as `state` (with other status `fields` in the same write) unless it already reached
    a terminal state or a live attempt owns it; the new status or None. OSError when the store refuses the write
    (read-only, no permission, full)."""
    if read_status(stage).get("state") in contract.TERMINAL or lease.live_holder(stage) is not None:
        return None
    return contract.update_status(stage, state=state, error=error, finished_at=time.time(), **fields)


def mark_ended(stage: str, state: StageState, error: str) -> dict[str, Any] | None:
    """`record_ended`, for callers whose own account of the stage stands when the store refuses the write: None
    then too (one unwritable stage directory never stops a driver or a command)."""
    try:
        return record_ended(stage, state, error)
    except OSError:
        return None


def read_many(
    sweep: str, urls: Sequence[str], limit: int = contract.MAX_RECORD_BYTES, schema: type[contract.Record] | None = None
) -> list[Any]:
    """Read many JSON-object records of the sweep `sweep`: a dict, None when missing, an `Unreadable` when damaged,
    of the wrong shape (`schema`, else the one its name calls for), or leading outside the sweep's directory.

    Local files are read directly, one after another (threads only add lock contention there); any other
    filesystem gets one batched read of each file's first `limit` + 1 bytes, which async ones (s3, gcs, http) serve
    concurrently. Never raises for one bad file: it comes back as its `Unreadable`, naming the file and the reason.
    """
    if not urls:
        return []
    tree = local_tree(sweep)
    if tree is not None:
        return [_read_one(u, tree.path_of(u), limit, tree.real, schema) for u in urls]
    fs, _ = rundir.filesystem(sweep)
    paths = [fs._strip_protocol(u) for u in urls]
    found = fs.cat_ranges(paths, [0] * len(paths), [limit + 1] * len(paths), on_error="return")
    return [_parsed(u, data, limit, schema) for u, data in zip(urls, found)]


def _read_one(url: str, path: str, limit: int, real: str, schema: type[contract.Record] | None) -> Any:
    try:
        data = contract.read_local(url, path, limit, real)
        return None if data is None else contract.parse_record(url, data, limit, schema)
    except Unreadable as e:
        return e


def _parsed(url: str, data: Any, limit: int, schema: type[contract.Record] | None) -> Any:
    if isinstance(data, FileNotFoundError) or data is None:
        return None
    if isinstance(data, OSError) and data.errno == errno.EINVAL and "range" in str(data).lower():
        data = b""  # S3 answers a range read of an empty object "416 range not satisfiable"
    if isinstance(data, OSError):
        return Unreadable(url, contract.os_reason(data, path=False))
    if isinstance(data, BaseException):
        return Unreadable(url, f"cannot be read ({type(data).__name__})")
    try:
        return contract.parse_record(url, data, limit, schema)
    except Unreadable as e:
        return e


def outside(sweep: str, url: str) -> str | None:
    """Why a local directory or file of the sweep leads outside it (a symbolic link out), or None (also off local
    disks)."""
    tree = local_tree(sweep)
    return contract.LEAVES if tree is not None and tree.leaves(url) else None


def read_statuses(sweep: str, keys: Iterable[str]) -> dict[str, dict[str, Any]]:
    """status.json of each job key ({} when absent; `damaged(...)` when unreadable or outside the store)."""
    keys = list(keys)
    stages = {k: stage_url(sweep, *split_key(k)) for k in keys}
    tree = local_tree(sweep)
    escapes = {k for k in keys if tree is not None and tree.leaves(stages[k])}
    wanted = [k for k in keys if k not in escapes]
    docs = read_many(sweep, [StageDir(stages[k]).status for k in wanted])
    out = {k: damaged(stages[k], contract.LEAVES) for k in escapes}
    for k, d in zip(wanted, docs):
        out[k] = damaged(d.url, d.reason) if isinstance(d, Unreadable) else d if isinstance(d, dict) else {}
    return {k: out[k] for k in keys}


def unreadable(statuses: Mapping[str, dict[str, Any]]) -> list[str]:
    """`path: reason` of every status that could not be read, in key order."""
    return [str(s["error"]) for s in statuses.values() if s.get(UNREADABLE)]


def log_files(stage: str, problems: list[str] | None = None) -> list[str]:
    """URLs of the files in a stage's `logs/` directory, sorted by name; a file (or `logs/` itself) that leads
    outside the sweep is left out and, with `problems`, listed there as `path: reason`."""
    fs, path = rundir.filesystem(StageDir(stage).logs)
    if not fs.exists(path):
        return []
    tree = local_tree(sweep_of(stage))
    out = []
    for found in sorted(fs.find(path)):
        url = fs.unstrip_protocol(found) if "://" in stage else found
        if tree is None or not tree.leaves(url):
            out.append(url)
        elif problems is not None:
            problems.append(f"{url}: {contract.LEAVES}")
    return out
