"""Nodes named in a stage's failures, and which of them its next attempt avoids. Torch-free.

A stage's status.json keeps `bad_nodes`: [{node, reason, at}], oldest first, one entry per node (naming a node again
moves it to the end with the new reason). A failure adds the node it names: a hung rank's node (the watchdog), the
nodes of the other ranks when a collective failed (rank 0, `extrema.entry`), the node a surviving rank saw go (its
ending record, read when the launcher records the stage failed), the node(s) Slurm marked down under a NODE_FAIL job.
The next submission of the stage leaves them out (`avoided`) as far as the job stays runnable: the most recently named
first, while enough nodes remain for the job.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

from extrema.run import contract

FIELD = "bad_nodes"
MAX_KEPT = 64  # entries a status record keeps (the oldest go first)
MAX_REASON = 300  # characters of a reason


def named(status: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The bad-node entries of a status record, oldest first (entries without a node name are passed over)."""
    entries = status.get(FIELD)
    if not isinstance(entries, list):
        return []
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("node"), str) and e["node"]]


def of_stage(stage_dir: str) -> list[dict[str, Any]]:
    """The bad-node entries of a stage's status record ([] when it has none or cannot be read: the next attempt then
    avoids nothing)."""
    try:
        return named(contract.read_status(stage_dir))
    except (contract.Unreadable, OSError):
        return []


def merged(entries: list[dict[str, Any]], nodes: Iterable[str], reason: str, at: float) -> list[dict[str, Any]]:
    """`entries` with `nodes` named (again) now for `reason`, oldest first, at most MAX_KEPT."""
    fresh = list(dict.fromkeys(n for n in nodes if n))
    kept = [e for e in entries if e.get("node") not in fresh]
    added = [{"node": n, "reason": reason[:MAX_REASON], "at": at} for n in fresh]
    return [*kept, *added][-MAX_KEPT:]


def added(stage_dir: str, nodes: Iterable[str], reason: str, at: float) -> dict[str, Any]:
    """The status fields that name `nodes` bad in the stage's record ({} when there are none), to write with the
    failure's own fields."""
    nodes = list(nodes)
    if not nodes:
        return {}
    try:
        status = contract.read_status(stage_dir)
    except contract.Unreadable:  # the writer replaces the damaged record
        status = {}
    return {FIELD: merged(named(status), nodes, reason, at)}


def avoided(
    entries: list[dict[str, Any]], available: Collection[str] | None, needed: int
) -> tuple[list[str], list[str]]:
    """(nodes to exclude, named nodes kept usable): the most recently named first, each excluded while at least
    `needed` of the `available` nodes remain. Nodes outside `available` are not excluded (the job never goes
    there); `available` None (unknown): every named node is excluded."""
    excluded: list[str] = []
    kept: list[str] = []
    pool = None if available is None else set(available)
    for entry in sorted(entries, key=lambda e: e.get("at") or 0, reverse=True):
        node = str(entry["node"])
        if node in excluded or node in kept:
            continue
        if pool is None:
            excluded.append(node)
        elif node in pool:
            (excluded if len(pool - {*excluded, node}) >= needed else kept).append(node)
    return sorted(excluded), kept


def kept_line(what: str, kept: list[str], available: Collection[str], needed: int) -> str:
    """The one line a submission says when it cannot avoid every bad node of a job."""
    return (
        f"{what}: not avoiding bad node(s) {', '.join(kept)}: the job needs {needed} of {len(available)} node(s) "
        "and must stay runnable"
    )
