"""The ledger of completed stages: their status, result and provenance records gathered into a few files per
sweep, so that `status`, `results` and a driver read a large finished sweep in a few requests, not three a stage.

A completed stage never changes again (the entry point skips it, and no command resets it), so its records can be
copied once and trusted. The ledger is a folder of parts, `<sweep>/ledger/<n>-<digest>.json`, each written once
(atomically, never rewritten) by whoever first reads the completed stages it holds: a driver, `status`, `results`.
Two writers at once write two parts with some entries in both, which is harmless. A read-only store gets no parts
(its readers read every record, as before), and a part that cannot be read is skipped: the stages it held are
read from their own records, so a damaged part hides nothing."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from typing import Any

from extrema.run import contract, rundir
from extrema.run.contract import StageState, Unreadable

FOLDER = "ledger"
PART = re.compile(r"(\d{6})-[0-9a-f]{16}\.json")
ENTRIES_PER_PART = 2000
MAX_PART_BYTES = 8 << 20  # a part larger than this is not read (its stages are read one by one)
MAX_PARTS = 1000  # parts read at most; past this, the rest are read stage by stage


def part_names(sweep: str) -> list[str]:
    """The ledger's part names, in order ([] without a ledger); listed fresh (other processes add parts)."""
    try:
        return rundir.fresh_names(rundir.join(sweep, FOLDER), PART)
    except PermissionError:  # a folder this reader may not list: its stages are read one by one
        return []


def read(sweep: str, inside: str | None = None) -> dict[str, dict[str, Any]]:
    """Job key -> {"status", "result", "provenance"} of every completed stage the ledger holds ({} without one),
    its parts applied in order (entries added, then the keys a part revokes removed); `inside`: the sweep's real
    local directory, out of which no part is read (links)."""
    out: dict[str, dict[str, Any]] = {}
    for name in part_names(sweep)[:MAX_PARTS]:
        try:
            doc = contract.read_record(rundir.join(sweep, FOLDER, name), MAX_PART_BYTES, inside)
        except Unreadable:
            continue
        if doc is not None:
            out.update(valid_entries(doc.get("entries")))
            revoked = doc.get("revoked")
            for key in revoked if isinstance(revoked, list) else []:
                if isinstance(key, str):
                    out.pop(key, None)
    return out


def valid_entries(entries: Any) -> dict[str, dict[str, Any]]:
    """The entries of a part that are what the ledger holds: a completed status, a result and a provenance, each
    as its schema reads it; anything else is left out, so that stage is read from its own records."""
    if not isinstance(entries, dict):
        return {}
    out = {}
    for key, entry in entries.items():
        if not (isinstance(key, str) and key.count("/") == 1 and isinstance(entry, dict)):
            continue
        status, result, prov = entry.get("status"), entry.get("result"), entry.get("provenance")
        if not (isinstance(status, dict) and isinstance(result, dict) and isinstance(prov, dict)):
            continue
        try:
            contract.checked(key, status, contract.StatusRecord)
            contract.checked(key, prov, contract.ProvenanceRecord)
        except Unreadable:
            continue
        if status.get("state") == StageState.COMPLETED:
            out[key] = {"status": status, "result": result, "provenance": prov}
    return out


def append(sweep: str, entries: Mapping[str, Mapping[str, Any]], revoked: Iterable[str] = ()) -> int:
    """Write the completed stages of `entries` as new parts, after a part revoking the keys `revoked` (stages
    found not completed, or completed anew, since they were ledgered); the number of entries written. OSError
    when the store refuses the write (read-only, no permission, full): the caller decides whether that matters."""
    fields = ("status", "result", "provenance")
    new = {k: {f: dict(e[f]) for f in fields} for k, e in sorted(entries.items())}
    new = {k: e for k, e in new.items() if e["status"].get("state") == StageState.COMPLETED}
    seq = max((int(n[:6]) for n in part_names(sweep)), default=-1) + 1
    docs: list[dict[str, Any]] = [{"revoked": sorted(set(revoked))}] if revoked else []
    keys = list(new)
    docs += [
        {"entries": {k: new[k] for k in keys[i : i + ENTRIES_PER_PART]}} for i in range(0, len(keys), ENTRIES_PER_PART)
    ]
    for doc in docs:
        text = rundir.dumps(doc, sort_keys=True, separators=(",", ":"))
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        rundir.write_text_atomic(rundir.join(sweep, FOLDER, f"{seq:06d}-{digest}.json"), text)
        seq += 1
    return len(keys)
