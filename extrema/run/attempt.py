"""What the job entry hands a stage besides its spec and directory: the fence of this attempt's commits and the
trackers its metrics go to. Torch-free.

`python -m extrema.entry` builds one per process (rank 0 holds the lease and opens the trackers) and calls
`run(spec, stage_dir, attempt)`; the stage passes it to its step loop's end, which fences every checkpoint commit
with it and mirrors every metrics record to it. A stage called outside the job entry (tests, tools) gets `BARE`.
"""

from __future__ import annotations

from dataclasses import dataclass

from extrema.run.lease import Fence, unfenced
from extrema.run.metrics_log import Mirror


@dataclass(frozen=True)
class Attempt:
    """One attempt at a stage, as the stage's code sees it."""

    fence: Fence = unfenced  # raises LeaseLost unless the attempt still owns the stage: called before each commit
    mirror: Mirror | None = None  # the stage's trackers (TensorBoard, W&B) on rank 0, when its spec asks for any


BARE = Attempt()  # outside the job entry: no lease to fence commits by, no trackers
