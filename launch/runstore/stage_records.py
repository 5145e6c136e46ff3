"""A sweep's stage records (status, result, provenance) read in as few requests as the ledger allows.

Completed stages come from the ledger (`launch.runstore.ledger`: a few files per sweep); every other stage, and a
completed one the ledger does not hold yet, is read from its own files. Completed stages read from their own files are
added to the ledger afterwards when the caller may write (a read-only store refuses it: nothing else changes).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from extrema.run import contract, rundir
from extrema.run.contract import StageState, Unreadable
from launch.runstore import ledger, store


@dataclass
class StageRecords:
    """Records by job key: every status (as `store.read_statuses` gives them), and the result and provenance of
    each completed stage (a dict, None when missing, or its `Unreadable`)."""

    statuses: dict[str, dict[str, Any]]
    results: dict[str, Any] = field(default_factory=dict)
    provenances: dict[str, Any] = field(default_factory=dict)
    ledgered: int = 0  # stages read from the ledger
    added: int = 0  # stages added to the ledger by this read

    def problems(self) -> list[str]:
        """`path: reason` of every unreadable status, result and provenance."""
        docs = [*self.results.values(), *self.provenances.values()]
        return [*store.unreadable(self.statuses), *(str(d) for d in docs if isinstance(d, Unreadable))]


def read(sweep: str, keys: Sequence[str], write: bool = True, fresh: bool = False) -> StageRecords:
    """The records of the stages `keys` of the sweep at URL `sweep`; completed stages read from their own files are
    added to the ledger when `write` and the store takes the write. `fresh`: read every stage from its own files and
    set the ledger right (revoking what it holds that is no longer so, as after a stage directory was removed)."""
    wanted = set(keys)
    ledgered = {k: e for k, e in ledger.read(sweep, store.real_tree(sweep)).items() if k in wanted}
    held = {} if fresh else ledgered
    direct = [k for k in keys if k not in held]
    statuses = store.read_statuses(sweep, direct)
    out = StageRecords({k: held[k]["status"] if k in held else statuses[k] for k in keys}, ledgered=len(held))
    for k, e in held.items():
        out.results[k], out.provenances[k] = e["result"], e["provenance"]
    done = [k for k in direct if statuses[k].get("state") == StageState.COMPLETED]
    read_results(sweep, done, out)
    if not write:
        return out
    found = {
        k: {"status": out.statuses[k], "result": out.results[k], "provenance": out.provenances[k]}
        for k in done
        if isinstance(out.results[k], dict) and isinstance(out.provenances[k], dict)
    }
    read_here = set(direct)
    stale = [k for k in ledgered if k in read_here and found.get(k) != ledgered[k]]
    try:
        out.added = ledger.append(sweep, {k: e for k, e in found.items() if k not in ledgered or k in stale}, stale)
    except OSError:
        out.added = 0  # a read-only store: its readers read stage by stage, as before
    return out


def read_results(sweep: str, keys: Sequence[str], into: StageRecords) -> None:
    """Read the result and provenance files of the stages `keys` (not ledgered) into `into`."""
    stages = {k: store.stage_url(sweep, *store.split_key(k)) for k in keys}
    tree = store.local_tree(sweep)
    keys = [k for k in keys if tree is None or not tree.leaves(stages[k])]  # such a stage's status says so already
    urls = [rundir.join(stages[k], name) for k in keys for name in (contract.RESULT, contract.PROVENANCE)]
    docs = store.read_many(sweep, urls)
    for i, k in enumerate(keys):
        into.results[k], into.provenances[k] = docs[2 * i], docs[2 * i + 1]
