"""Runs a store already holds under the id an earlier identity rule gave them.

Before 2026-12 a run's id hashed every setting, loader workers, cadences, retention and object-store access included
(`extrema.spec.identity(..., earlier=True)`). A sweep file swept then and again now names the same experiments: each
run whose current id the store does not hold, but whose earlier id it does, keeps its earlier id (the name of its
directory), with its checkpoints and results. Nothing is moved or renamed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from launch.sweepfile.model import Run, RunIds


def under_earlier_ids(runs: Sequence[Run], stored: Iterable[str]) -> list[Run]:
    """The runs, each named by its earlier id where the store (`stored`: the run ids it holds) has that and not the
    current one; the current id everywhere else."""
    held = set(stored)
    if not held:
        return list(runs)
    current = {r.run_id for r in runs}
    earlier = RunIds(earlier=True)
    out: list[Run] = []
    for r in runs:
        if r.run_id not in held:
            old = earlier(r.experiment)
            if old in held and old not in current:
                r = replace(r, run_id=old)
        out.append(r)
    return out
