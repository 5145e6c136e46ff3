"""A bounded local cache of shard blocks for one process: each block fetched whole by one ranged read, kept in an
unlinked temporary file (nothing is left on disk after the process, even after kill -9), evicted in the order it
was fetched, prefetched by background threads while the current blocks are decoded."""

from __future__ import annotations

import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO

FETCH_THREADS = 2


class CacheBoundError(ValueError):
    """A cache bound that cannot hold the blocks it must hold."""


@dataclass
class CacheStats:
    """What a cache did: ranged reads, bytes fetched, the most bytes it held at once, fetches per block."""

    requests: int = 0
    bytes_fetched: int = 0
    peak_bytes: int = 0
    fetches: dict[int, int] = field(default_factory=dict)  # block -> times fetched


@dataclass
class _Entry:
    size: int
    done: Future[IO[bytes]] = field(default_factory=Future)


class BlockCache:
    """Blocks by id, each `sizes[id]` bytes as `fetch(id)` returns them, at most `limit` bytes held (fetches under
    way included)."""

    def __init__(self, sizes: Callable[[int], int], fetch: Callable[[int], bytes], limit: int, directory: str | None):
        self.sizes, self.fetch, self.limit, self.directory = sizes, fetch, limit, directory
        self.stats = CacheStats()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    @property
    def held(self) -> int:
        """Bytes held now (fetches under way included)."""
        return self._held

    def _evict_for(self, size: int, keep: set[int]) -> bool:
        """Close the oldest finished blocks not in `keep` until `size` more bytes fit; False when they cannot."""
        for block in list(self._entries):
            if self._held + size <= self.limit:
                break
            entry = self._entries[block]
            if block in keep or not entry.done.done():
                continue
            del self._entries[block]
            self._held -= entry.size
            if entry.done.exception() is None:
                entry.done.result().close()
        return self._held + size <= self.limit

    def _start(self, block: int, keep: set[int]) -> _Entry | None:
        """Begin fetching `block` if room can be made (lock held); the entry, or None when it does not fit."""
        size = self.sizes(block)
        if size > self.limit:
            raise CacheBoundError(f"a block of {size} bytes does not fit the shard cache bound of {self.limit} bytes")
        if not self._evict_for(size, keep | {block}):
            return None
        entry = _Entry(size)
        self._entries[block] = entry
        self._held += size
        self.stats.peak_bytes = max(self.stats.peak_bytes, self._held)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="shard-fetch")
        self._pool.submit(self._fill, block, entry)
        return entry

    def _fill(self, block: int, entry: _Entry) -> None:
        try:
            data = self.fetch(block)
            file = tempfile.TemporaryFile(dir=self.directory)  # noqa: SIM115  (closed when evicted)
            try:
                file.write(data)
                file.flush()
            except BaseException:
                file.close()
                raise
        except BaseException as e:
            entry.done.set_exception(e)
            return
        with self._lock:
            self.stats.requests += 1
            self.stats.bytes_fetched += len(data)
            self.stats.fetches[block] = self.stats.fetches.get(block, 0) + 1
        entry.done.set_result(file)

    def prefetch(self, blocks: Iterable[int], keep: set[int]) -> None:
        """Start fetching those of `blocks` not held, in order, while they fit without evicting `keep`."""
        with self._lock:
            for block in blocks:
                if block not in self._entries and self._start(block, keep) is None:
                    break

    def read(self, block: int, start: int, end: int) -> bytes:
        """Bytes [start, end) of `block`, fetched first when it is not held (evicting others); a failed fetch raises
        here and is forgotten, so that the next read fetches again."""
        while True:
            with self._lock:
                entry = self._entries.get(block) or self._start(block, {block})
                if entry is not None and entry.done.done() and entry.done.exception() is None:
                    return os.pread(entry.done.result().fileno(), end - start, start)
                waited = entry or next(e for e in self._entries.values() if not e.done.done())  # room once one lands
            try:
                waited.done.result()
            except BaseException:
                if waited is entry:
                    self.drop(block)
                    raise

    def drop(self, block: int) -> None:
        """Forget `block` (its file closed), so that the next read fetches it again."""
        with self._lock:
            entry = self._entries.pop(block, None)
            if entry is None:
                return
            self._held -= entry.size
        if entry.done.done() and entry.done.exception() is None:
            entry.done.result().close()

    def close(self) -> None:
        """Close every held block's file (fetches under way finish first)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for block in list(self._entries):
            self.drop(block)
