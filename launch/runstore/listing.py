"""The sweeps a run-store root holds: each `<root>/<sweep>/` with a manifest, its runs and its stages' states."""

from __future__ import annotations

from collections import Counter
from typing import Any

from extrema.run import rundir
from launch.runstore import store

MAX_SWEEPS = 1000  # directories of one root looked at; a root is a store, not a file system to crawl
NOT_SUBMITTED = "not submitted"


def sweeps_in(root: str) -> list[dict[str, Any]]:
    """One record per sweep under `root` (name, url, runs, jobs, states: state -> count, source), by name; a sweep
    whose manifest is unreadable is listed with `unreadable` and its reason."""
    fs, path = rundir.filesystem(root)
    try:
        names = sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))[:MAX_SWEEPS]
    except (FileNotFoundError, NotADirectoryError):
        return []
    out: list[dict[str, Any]] = []
    for name in names:
        url = rundir.join(root, name)
        if not rundir.exists(rundir.join(url, store.MANIFEST)):
            continue
        try:
            manifest = store.read_manifest(url)
            runs = store.stored_runs_of(url, manifest or {})
        except (store.Unreadable, ValueError) as e:
            out.append({"sweep": name, "url": url, "unreadable": str(e)})
            continue
        keys = [k for r in runs for k in r.job_keys()]
        statuses = store.read_statuses(url, keys)
        states = Counter(
            "unreadable" if s.get(store.UNREADABLE) else str(s.get("state") or NOT_SUBMITTED) for s in statuses.values()
        )
        source = (manifest or {}).get("source")
        out.append(
            {"sweep": name, "url": url, "runs": len(runs), "jobs": len(keys), "states": dict(states), "source": source}
        )
    return out


def summary(states: dict[str, int]) -> str:
    """`3 completed, 1 failed`: the counts, largest first."""
    return ", ".join(f"{n} {state}" for state, n in sorted(states.items(), key=lambda kv: (-kv[1], kv[0]))) or "-"
