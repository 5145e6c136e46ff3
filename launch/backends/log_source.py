"""One log as the launcher reads it: a name, a reader of its bytes from an offset (so that `logs --follow` prints
only what is new), and what labels each line with its node and rank. What every backend's log readers return."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from extrema.run import rundir


@dataclass(frozen=True)
class LogSource:
    """One log: a name to show, a reader of its bytes from an offset, and what names each line's node and rank."""

    name: str
    read: Callable[[int], bytes]
    label: Callable[[str], str] | None = None  # a complete line -> the line with its node and rank in front
    size: Callable[[], int] | None = None  # its length in bytes, where it can be asked without reading it


def tail(src: LogSource, limit: int) -> bytes:
    """The last `limit` bytes of a log (read from where they start when its size can be asked)."""
    start = max(0, src.size() - limit) if src.size is not None else 0
    return src.read(start)[-limit:]


class Lines:
    """Labels the lines of one log as its chunks arrive; a line cut between two chunks is labelled once."""

    def __init__(self, label: Callable[[str], str] | None) -> None:
        self.label = label
        self.partial = ""

    def feed(self, text: str, final: bool = False) -> str:
        """The labelled complete lines of `text` (and the pending partial line when `final`)."""
        if self.label is None:
            return text
        text, self.partial = self.partial + text, ""
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith(("\n", "\r")) and not final:
            self.partial = lines.pop()
        return "".join(self.label(line) for line in lines)


def rank_hosts(ranks: object) -> dict[int, str]:
    """rank -> host from provenance's `ranks` list (entries that are not well-formed are skipped)."""
    out: dict[int, str] = {}
    for r in ranks if isinstance(ranks, list) else []:
        if isinstance(r, dict) and isinstance(r.get("rank"), int) and isinstance(r.get("host"), str):
            out[r["rank"]] = r["host"]
    return out


def file_source(url: str) -> LogSource:
    """A log file on any fsspec URL."""

    def read(offset: int) -> bytes:
        fs, path = rundir.filesystem(url)

        def from_offset(f: Any) -> bytes:
            f.seek(offset)
            data: bytes = f.read()
            return data

        return rundir.read_stable(fs, path, "rb", from_offset)

    def size() -> int:
        fs, path = rundir.filesystem(url)
        return int(fs.size(path))

    return LogSource(url, read, size=size)
