"""A stage's checkpoint folder as the run contract lays it out, torch-free: which entries are steps, which steps are
complete, and which complete steps the stage's retention no longer keeps.

`<stage>/ckpt/step-<N>/` holds one DCP checkpoint, complete once its `.metadata` is in place (renamed there last);
`<stage>/ckpt/corrupt/` holds steps set aside because they did not load. A step's data files are named
`__<rank>_<save>_<n>.distcp`, `<save>` drawn afresh by each save, so that an attempt which lost its stage and writes
on cannot overwrite the files a later attempt committed under the same step (older steps: `__<rank>_<n>.distcp`).
A stage keeps its newest `keep_last` complete steps and every complete step that is a multiple of `keep_every`
(`extrema.spec_groups.Retention`); downstream stages and `export` read the newest complete step, which retention
always keeps (`keep_last` >= 1).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

STEP_DIR = re.compile(r"step-(\d{1,18})")
COMMIT_MARKER = ".metadata"  # a step is complete once this file is in its directory
CORRUPT_DIR = "corrupt"
SHARD_FILE = re.compile(r"__(\d{1,9})_(?:([0-9a-f]{8,32})_)?(\d{1,9})\.distcp")


def step_of(name: str) -> int | None:
    """The step a `step-<N>` directory name holds, or None for any other name."""
    m = STEP_DIR.fullmatch(name)
    return int(m.group(1)) if m else None


def shard_rank(name: str) -> int | None:
    """The rank that wrote a step's data file, or None for a name no save writes."""
    m = SHARD_FILE.fullmatch(name)
    return int(m.group(1)) if m else None


def beyond_retention(complete: Iterable[int], keep_last: int, keep_every: int | None = None) -> list[int]:
    """The complete steps a stage with this retention no longer keeps, ascending: all but the newest `keep_last`
    (at least one), sparing multiples of `keep_every`."""
    steps = sorted(set(complete))
    older = steps[: max(0, len(steps) - max(1, keep_last))]
    return [s for s in older if not (keep_every and s % keep_every == 0)]
