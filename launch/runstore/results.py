"""Collect a sweep's result files into one pyarrow Table (a row per run and stage) and write it anywhere.

Columns: run_id, stage, state, one column per swept dotted path, every result.json metric (nested keys
dotted), then attempts, elapsed_s, submitted_at / started_at / finished_at (UTC timestamps), backend, job_id,
and the provenance: host, git_sha, git_dirty, world_size; last the error of a failed stage.
"""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from extrema.run import contract, rundir
from launch.runstore import store
from launch.runstore.stage_records import StageRecords

Format = Literal["parquet", "csv", "json"]
TIMESTAMPS = ("submitted_at", "started_at", "finished_at")
TYPED: dict[str, pa.DataType] = {
    "run_id": pa.string(),
    "stage": pa.string(),
    "state": pa.string(),
    "attempts": pa.int64(),
    "elapsed_s": pa.float64(),
    **dict.fromkeys(TIMESTAMPS, pa.timestamp("ms", tz="UTC")),
    "backend": pa.string(),
    "job_id": pa.string(),
    "host": pa.string(),
    "git_sha": pa.string(),
    "git_dirty": pa.bool_(),
    "code": pa.string(),
    "world_size": pa.int64(),
    "error": pa.string(),
}
HEAD = ("run_id", "stage", "state")
TAIL = tuple(k for k in TYPED if k not in HEAD)


def flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys."""
    out: dict[str, Any] = {}
    for k, v in doc.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def _row(entry: store.StoredRun, stage: str, status: Any, result: Any, prov: Any, now: float) -> dict[str, Any]:
    status = status if isinstance(status, dict) else {}
    prov = prov if isinstance(prov, dict) else {}
    started, finished = status.get("started_at"), status.get("finished_at")
    elapsed = None
    if isinstance(started, (int, float)):
        elapsed = (finished if isinstance(finished, (int, float)) else now) - started
    row: dict[str, Any] = {"run_id": entry.run_id, "stage": stage, "state": status.get("state")}
    row.update(flatten(entry.overrides))
    for k, v in flatten(result if isinstance(result, dict) else {}).items():
        row[f"result.{k}" if k in row or k in TYPED else k] = v
    row.update(
        attempts=status.get("attempts"),
        elapsed_s=elapsed,
        **{k: status.get(k) for k in TIMESTAMPS},
        backend=status.get("backend"),
        job_id=status.get("job_id"),
        host=prov.get("host") or status.get("host"),
        git_sha=prov.get("git_sha"),
        git_dirty=prov.get("git_dirty"),
        code=prov.get("code") or prov.get("code_source"),
        world_size=prov.get("world_size"),
        error=status.get("error"),
    )
    return row


def rows(
    sweep_url: str,
    runs: Sequence[store.StoredRun],
    statuses: Mapping[str, Any] | None = None,
    problems: list[str] | None = None,
    read: StageRecords | None = None,
) -> list[dict[str, Any]]:
    """One dict per run and stage, read from the run store (status.json from `statuses` by job key when given; the
    result and provenance of a stage from `read` when it holds them, their problems listed by its reader).

    An unreadable file leaves its fields empty and is appended to `problems` as `path: reason`; so is a stage
    directory that leads outside the store, whose files are not read.
    """
    pairs = [(r, s, store.stage_url(sweep_url, r.run_id, s)) for r in runs for s in r.stages]
    names = (
        (contract.RESULT, contract.PROVENANCE)
        if statuses is not None
        else (contract.STATUS, contract.RESULT, contract.PROVENANCE)
    )
    tree = store.local_tree(sweep_url)
    away = {url for _, _, url in pairs if tree is not None and tree.leaves(url)}
    held = read.results if read is not None else {}
    wanted = [
        rundir.join(url, n)
        for r, s, url in pairs
        if url not in away and store.job_key(r.run_id, s) not in held
        for n in names
    ]
    found = dict(zip(wanted, store.read_many(sweep_url, wanted)))
    if problems is not None:
        problems += [f"{url}: {contract.LEAVES}" for url in away if statuses is None]  # else listed with them
        problems += [str(d) for d in found.values() if isinstance(d, store.Unreadable)]
    now = time.time()
    out = []
    for r, s, url in pairs:
        key = store.job_key(r.run_id, s)
        status, result, prov = (found.get(rundir.join(url, n)) for n in (contract.STATUS, *names[-2:]))
        if read is not None and key in held:
            result, prov = held[key], read.provenances[key]
        if statuses is not None:
            status = statuses.get(key)
        out.append(_row(r, s, status, result, prov, now))
    return out


def _column(name: str, values: list[Any]) -> pa.Array:
    if name in TIMESTAMPS:
        ms = [int(v * 1000) if isinstance(v, (int, float)) else None for v in values]
        return pa.array(ms, type=TYPED[name])
    try:
        return pa.array(values, type=TYPED.get(name))
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        return pa.array(
            [None if v is None else json.dumps(v, sort_keys=True, default=str) for v in values], pa.string()
        )


def to_table(records: Sequence[dict[str, Any]]) -> pa.Table:
    """The rows as a typed Arrow table; a column mixing types falls back to JSON text."""
    middle: dict[str, None] = {}
    for r in records:
        middle.update(dict.fromkeys(k for k in r if k not in TYPED))
    names = [*HEAD, *middle, *TAIL]
    return pa.table({n: _column(n, [r.get(n) for r in records]) for n in names})


def collect(
    sweep_url: str,
    runs: Sequence[store.StoredRun],
    statuses: Mapping[str, Any] | None = None,
    problems: list[str] | None = None,
    read: StageRecords | None = None,
) -> pa.Table:
    """The results table of a sweep (statuses by job key, and records `read`, when already read); unreadable files
    go to `problems`."""
    return to_table(rows(sweep_url, runs, statuses, problems, read))


def _text_safe(table: pa.Table) -> pa.Table:
    """Nested columns (lists, structs) as JSON text, for CSV."""
    for i, f in enumerate(table.schema):
        if pa.types.is_nested(f.type):
            text = [None if v is None else json.dumps(v, default=str) for v in table.column(i).to_pylist()]
            table = table.set_column(i, f.name, pa.array(text, pa.string()))
    return table


def encode(table: pa.Table, fmt: Format) -> bytes:
    """The table as parquet, CSV or a JSON list of records (timestamps in ISO 8601)."""
    buf = io.BytesIO()
    if fmt == "parquet":
        pq.write_table(table, buf)
    elif fmt == "csv":
        pacsv.write_csv(_text_safe(table), buf)
    elif fmt == "json":  # standard JSON: a non-finite number is null with `<column>.nonfinite` beside it
        rows = rundir.finite_json(table.to_pylist())
        buf.write(json.dumps(rows, indent=2, allow_nan=False, default=lambda v: v.isoformat()).encode() + b"\n")
    else:
        raise ValueError(f"unknown format {fmt!r}")
    return buf.getvalue()


def write(table: pa.Table, url: str, fmt: Format) -> None:
    """Write the table to any fsspec URL, atomically (write then rename)."""
    fs, path = rundir.filesystem(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(encode(table, fmt))
    fs.mv(tmp, path)
