"""The metrics log of a stage: append-only JSON lines, mirrored to the stage's trackers. Torch-free."""

from __future__ import annotations

import os
from typing import Any, Protocol

from extrema.run.rundir import dumps, ends_a_line, local_path, read_jsonl, write_text_atomic


class Mirror(Protocol):
    """Where logged numbers are also sent (the stage's trackers: TensorBoard, W&B)."""

    def resumed_at(self, step: int | None, records: list[dict[str, Any]]) -> None: ...

    def publish(self, record: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...


class MetricsLog:
    """An append-only JSON-lines log. On a filesystem each record is appended (a write of one line, whatever the
    log's length); on an object store, which cannot append, the whole log is rewritten atomically on flush."""

    def __init__(self, url: str, keep_after_step: int | None = None, mirror: Mirror | None = None) -> None:
        self.url = url
        self.local = local_path(url)
        self.records = read_jsonl(url)
        self.trackers = mirror  # TensorBoard / W&B of this stage, when its spec asks for them
        self.pending: list[dict[str, Any]] = []  # records not written yet (appended on a filesystem)
        if keep_after_step is not None:
            # On resume, drop records from steps the resumed run will log again.
            kept = [r for r in self.records if r.get("step", -1) <= keep_after_step]
            if self.local is not None and (len(kept) != len(self.records) or not ends_a_line(self.local)):
                write_text_atomic(url, "".join(dumps(r, sort_keys=True) + "\n" for r in kept))
            self.records = kept
        if self.trackers is not None:
            self.trackers.resumed_at(keep_after_step, self.records)

    def log(self, record: dict[str, Any], flush: bool = False) -> None:
        """Append one record (and send its numbers to the stage's trackers); write the file when flush is set."""
        self.records.append(record)
        self.pending.append(record)
        if self.trackers is not None:
            self.trackers.publish(record)
        if flush:
            self.flush()

    def flush(self) -> None:
        """Write what was logged since the last flush: appended on a filesystem, the whole log elsewhere."""
        if self.local is not None:
            if self.pending:
                os.makedirs(os.path.dirname(self.local) or ".", exist_ok=True)
                with open(self.local, "a") as f:
                    f.write("".join(dumps(r, sort_keys=True) + "\n" for r in self.pending))
                    f.flush()
        else:
            write_text_atomic(self.url, "".join(dumps(r, sort_keys=True) + "\n" for r in self.records))
        self.pending = []
        if self.trackers is not None:
            self.trackers.flush()
