"""The metrics log of a stage: append-only JSON lines, mirrored to the stage's trackers. Torch-free.

On a filesystem the log is one file, `metrics.jsonl`, and each record is appended. An object store cannot append,
so there the log is a folder of parts beside it, `metrics/000000.jsonl`, `metrics/000001.jsonl`, ...: a flush
rewrites only the last part, and a part that reaches `PART_BYTES` is left as it is and the next one begun. Every
write is then at most about `PART_BYTES`, however long the run; a crash between two writes loses no complete part.
Readers use `read_records` (the whole log, bounded) or `read_tail` (the newest records), which know both layouts.
"""

from __future__ import annotations

import os
import re
from typing import Any, Protocol

from extrema.run import contract
from extrema.run.rundir import (
    dumps,
    ends_a_line,
    filesystem,
    fresh_names,
    join,
    local_path,
    read_jsonl,
    write_text_atomic,
)

PART_BYTES = 1 << 20
PART_NAME = re.compile(r"(\d{6})\.jsonl")


class Mirror(Protocol):
    """Where logged numbers are also sent (the stage's trackers: TensorBoard, W&B)."""

    def resumed_at(self, step: int | None, records: list[dict[str, Any]]) -> None: ...

    def publish(self, record: dict[str, Any]) -> None: ...

    def flush(self) -> None: ...


def parts_url(url: str) -> str:
    """The folder of an object-store log's parts: `<stage>/metrics` beside `<stage>/metrics.jsonl`."""
    return url.removesuffix(".jsonl")


def part_urls(url: str) -> list[str]:
    """The URLs of a log's parts, in order ([] on a filesystem, or before the first flush)."""
    return [join(parts_url(url), n) for n in fresh_names(parts_url(url), PART_NAME)]


def read_records(url: str, inside: str | None = None, limit: int = contract.MAX_LOG_BYTES) -> list[dict[str, Any]]:
    """Every record of a stage's log in order, whichever layout it has; at most `limit` bytes are read in all
    (the oldest records first). Unreadable when a file of it cannot be read (`contract.read_bytes`)."""
    out = contract.read_lines(url, limit, inside)
    budget = limit - sum(len(dumps(r)) + 1 for r in out)
    for part in part_urls(url):
        if budget <= 0:
            break
        records = contract.read_lines(part, budget, inside)
        budget -= sum(len(dumps(r)) + 1 for r in records)
        out.extend(records)
    return out


def read_tail(url: str, limit: int, inside: str | None = None) -> list[dict[str, Any]]:
    """The newest records of a stage's log, from at most its last `limit` bytes (one read of one file)."""
    parts = part_urls(url)
    return contract.read_lines(parts[-1] if parts else url, limit, inside, tail=True)


class MetricsLog:
    """An append-only JSON-lines log: appended on a filesystem, written in parts on an object store (see above)."""

    def __init__(self, url: str, keep_after_step: int | None = None, mirror: Mirror | None = None) -> None:
        self.url = url
        self.local = local_path(url)
        self.trackers = mirror  # TensorBoard / W&B of this stage, when its spec asks for them
        self.pending: list[dict[str, Any]] = []  # records not written yet
        parts = self._read_parts()
        self.records = [r for part in parts for r in part]
        if keep_after_step is not None:
            # On resume, drop records from steps the resumed run will log again.
            kept = [r for r in self.records if r.get("step", -1) <= keep_after_step]
            if self.local is not None and (len(kept) != len(self.records) or not ends_a_line(self.local)):
                write_text_atomic(url, "".join(dumps(r, sort_keys=True) + "\n" for r in kept))
            if self.local is None and len(kept) != len(self.records):
                parts = self._cut_parts(parts, len(kept))
            self.records = kept
        self.open_part = max(len(parts) - 1, 0)  # object stores: the part each flush rewrites
        self.open_records = parts[-1] if parts else []
        if self.trackers is not None:
            self.trackers.resumed_at(keep_after_step, self.records)

    def _read_parts(self) -> list[list[dict[str, Any]]]:
        if self.local is not None:
            return [read_jsonl(self.url)]  # its own file, whole: a resume rewrites it from these records
        legacy = read_jsonl(self.url)  # one whole object, as earlier versions wrote
        parts = [contract.read_lines(u) for u in part_urls(self.url)]
        if legacy and not parts:
            self._write_part(0, legacy)
            filesystem(self.url)[0].rm(filesystem(self.url)[1])
            parts = [legacy]
        return parts

    def _cut_parts(self, parts: list[list[dict[str, Any]]], keep: int) -> list[list[dict[str, Any]]]:
        """Keep the first `keep` records: the part holding the cut is rewritten, the parts after it removed."""
        out: list[list[dict[str, Any]]] = []
        for records in parts:
            if keep <= 0:
                break
            out.append(records[:keep])
            keep -= len(records)
        if out:
            self._write_part(len(out) - 1, out[-1])
        fs, _ = filesystem(self.url)
        for index in range(len(out), len(parts)):
            fs.rm(filesystem(self._part(index))[1])
        return out

    def _part(self, index: int) -> str:
        return join(parts_url(self.url), f"{index:06d}.jsonl")

    def _write_part(self, index: int, records: list[dict[str, Any]]) -> None:
        write_text_atomic(self._part(index), "".join(dumps(r, sort_keys=True) + "\n" for r in records))

    def log(self, record: dict[str, Any], flush: bool = False) -> None:
        """Append one record (and send its numbers to the stage's trackers); write the file when flush is set."""
        self.records.append(record)
        self.pending.append(record)
        if self.trackers is not None:
            self.trackers.publish(record)
        if flush:
            self.flush()

    def flush(self) -> None:
        """Write what was logged since the last flush: appended on a filesystem, into the open part elsewhere."""
        if self.local is not None:
            if self.pending:
                os.makedirs(os.path.dirname(self.local) or ".", exist_ok=True)
                with open(self.local, "a") as f:
                    f.write("".join(dumps(r, sort_keys=True) + "\n" for r in self.pending))
                    f.flush()
        elif self.pending:
            size = sum(len(dumps(r, sort_keys=True)) + 1 for r in self.open_records)
            for record in self.pending:
                line = len(dumps(record, sort_keys=True)) + 1
                if self.open_records and size + line > PART_BYTES:
                    self._write_part(self.open_part, self.open_records)  # full: left as it is from now on
                    self.open_part, self.open_records, size = self.open_part + 1, [], 0
                self.open_records.append(record)
                size += line
            self._write_part(self.open_part, self.open_records)
        self.pending = []
        if self.trackers is not None:
            self.trackers.flush()
