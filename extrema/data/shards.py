"""A map-style dataset over tar shards (extrema.data.shard_format) on any fsspec URL.

Start-up reads the split's index.json and members.bin (two requests); nothing lists individual images. Sample i
is read from its shard by one range request covering its tar header and data; the header is checked against the
index. Local shards are read with pread on file handles kept open per process; object stores get one GET.

Training reads that follow the shard-local order (extrema.data.shard_order, `follow`) on an object store fetch
whole blocks instead: one ranged GET per block into this process's bounded cache (extrema.data.shard_cache), the
current window's blocks and then the next window's fetched in the background while samples are decoded. Every
member's tar header is checked when its block arrives and again when it is read from the cache; a block that
fails is fetched once more and refused by name when it fails again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor
from torch.utils.data import Dataset

from extrema.data import decode
from extrema.data.object_store import DataSourceError, ProcessFs, access_error, missing_bucket
from extrema.data.shard_cache import BlockCache, CacheBoundError, CacheStats
from extrema.data.shard_format import IMAGE_EXTENSIONS, ShardIndexError, join, member_header_name, read_index
from extrema.data.shard_order import BlockOrder, OrderSettings
from extrema.spec import StorageSpec

OPEN_FILES = 64  # local shard files kept open per process
HEADER = 512
log = logging.getLogger(__name__)


def cache_settings(storage: StorageSpec | None) -> tuple[int | None, str | None]:
    """(bound in bytes, directory) of the shard cache: `data.storage.cache_bytes` (None: two windows of the largest
    blocks) and `data.storage.cache_dir` (None: the temporary directory); defaults while the spec lacks them."""
    return getattr(storage, "cache_bytes", None), getattr(storage, "cache_dir", None)


@dataclass(frozen=True)
class Following:
    """A shard-local order the training reads follow: the order, the samples an epoch uses, the last epoch read,
    and each block's byte span in its shard."""

    order: BlockOrder
    used: int
    last_epoch: int
    shard: np.ndarray  # block -> shard number
    lo: np.ndarray  # block -> first byte (its first member's header)
    hi: np.ndarray  # block -> one past its last member's data

    def size(self, block: int) -> int:
        """Bytes of one block's span."""
        return int(self.hi[block] - self.lo[block])

    def next_window(self, epoch: int, k: int) -> tuple[int, int] | None:
        """The window read after window k of `epoch` (the next epoch's first once this one's used samples end)."""
        sequence = self.order.block_sequence(epoch)
        first = int(self.order.counts[sequence[: (k + 1) * self.order.window]].sum())
        if k + 1 < self.order.num_windows and first < self.used:
            return epoch, k + 1
        return (epoch + 1, 0) if epoch + 1 <= self.last_epoch else None


class _ProcessReads:
    """One process's block cache and where it is in the order (made again in each loader worker)."""

    def __init__(self, cache: BlockCache) -> None:
        self.cache = cache
        self.pid = os.getpid()
        self.window: tuple[int, int] = (-1, -1)
        self.positions: tuple[int, np.ndarray] = (-1, np.empty(0, dtype=np.int64))


class ShardedImages(Dataset[tuple[Tensor, int]]):
    """One split written by `extrema-launch data shard`: (uint8 RGB image, class) by global index."""

    def __init__(
        self,
        url: str,
        storage: StorageSpec | None = None,
        decoding: decode.Decoding | None = None,
        order: OrderSettings | None = None,
    ) -> None:
        self.url = url
        self.decoding = decoding or decode.Decoding()
        self.order = order or OrderSettings()
        self.cache_bytes, self.cache_dir = cache_settings(storage)
        try:
            self.source = ProcessFs(url, storage)
            index = read_index(self.source.get(), self.source.path)
        except (ShardIndexError, DataSourceError):
            raise
        except FileNotFoundError as e:
            bucket = missing_bucket(self.source.get(), url, storage)
            raise bucket or DataSourceError(f"no shards at {url}: {e} (written by `extrema-launch data shard`)") from e
        except Exception as e:
            raise access_error(e, url, storage) from e
        self.classes = index.classes
        self.shard_counts = tuple(s.count for s in index.shards)
        self.shard_names = [s.name for s in index.shards]
        self.starts = index.starts
        self.members = index.members
        self.targets = torch.from_numpy(index.members["label"].astype(np.int64))
        self.image_requests = 0  # one-image range reads made by this process (GETs on an object store)
        self.following: Following | None = None
        self._reads: _ProcessReads | None = None
        self._open: OrderedDict[str, int] = OrderedDict()

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # file descriptors stay with their process
        state["_reads"] = None  # and so do the block cache's files and threads
        return state

    @property
    def requests(self) -> int:
        """Range reads made by this process: one per image read alone, one per block fetched."""
        return self.image_requests + self.cache_stats.requests

    @property
    def cache_stats(self) -> CacheStats:
        """What this process's block cache did (nothing before the first block read)."""
        reads = self._reads
        return reads.cache.stats if reads is not None and reads.pid == os.getpid() else CacheStats()

    @property
    def remote(self) -> bool:
        """Whether the shards are on an object store (not a local filesystem)."""
        return not isinstance(self.source.get(), LocalFileSystem)

    def follow(self, order: BlockOrder, used: int, last_epoch: int) -> None:
        """Read `encoded(i, epoch)` by blocks of `order` from now on (object stores only: local files are read in
        place); `used` samples of each epoch are read, up to epoch `last_epoch`."""
        if order.shard_counts != self.shard_counts:
            raise ValueError(f"the order is of another shard layout than {self.url}'s")
        shard = np.searchsorted(self.starts, order.starts, side="right") - 1
        offsets = self.members["offset"].astype(np.int64)
        ends = offsets + self.members["size"].astype(np.int64)
        lo = np.minimum.reduceat(offsets, order.starts) - HEADER
        hi = np.maximum.reduceat(ends, order.starts)
        self.following = Following(order, used, last_epoch, shard, lo, hi)
        largest = int((hi - lo).max())
        if self.cache_bytes is not None and self.cache_bytes < largest:
            raise CacheBoundError(
                f"the shard cache bound of {self.cache_bytes} bytes is smaller than a block of {self.url} "
                f"({largest} bytes): raise data.storage.cache_bytes or lower data.order_block"
            )
        window_bytes = int(np.sort(hi - lo)[-order.window :].sum())
        if self.cache_bytes is not None and self.cache_bytes < window_bytes and self.remote:
            log.warning(
                "shard cache bound %d bytes is below one window of %s (up to %d bytes): blocks will be fetched "
                "more than once an epoch",
                self.cache_bytes,
                self.url,
                window_bytes,
            )
        self._reads = None

    def _process_reads(self, following: Following) -> _ProcessReads:
        reads = self._reads
        if reads is None or reads.pid != os.getpid():
            order = following.order
            limit = self.cache_bytes or 2 * order.window * int((following.hi - following.lo).max())
            reads = self._reads = _ProcessReads(BlockCache(following.size, self._fetch_block, limit, self.cache_dir))
        return reads

    def __len__(self) -> int:
        return len(self.members)

    def _read(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of one shard file."""
        fs = self.source.get()
        path = join(self.source.path, name)
        if not isinstance(fs, LocalFileSystem):
            try:
                data: bytes = fs.cat_file(path, start=start, end=end)
            except OSError as e:
                if e.errno == errno.EINVAL and "range" in str(e):  # S3's 416: the object ends before `start`
                    raise ShardIndexError(f"{self.url}/{name}: no bytes at {start}: the shard is truncated") from e
                raise
            return data
        fd = self._open.pop(path, None)  # this process's own descriptors; pread needs no file position
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self._open) >= OPEN_FILES:
                os.close(self._open.popitem(last=False)[1])
        self._open[path] = fd
        return os.pread(fd, end - start, start)

    def _check(self, i: int, shard: str, blob: bytes) -> None:
        """Refuse the bytes read for sample i unless they are its tar header and image as the index says."""
        offset, size = int(self.members[i]["offset"]), int(self.members[i]["size"])
        try:
            name, stored = member_header_name(blob[:HEADER])
        except ShardIndexError as e:
            name, stored = f"<{e}>", -1
        if stored != size or len(blob) != HEADER + size or not name.lower().endswith(IMAGE_EXTENSIONS):
            raise ShardIndexError(
                f"{self.url}/{shard}: sample {i} at byte {offset} is {name!r} of {stored} bytes, not the image of "
                f"{size} bytes the index says (a stale or foreign index, or a damaged shard)"
            )

    def _fetch_block(self, block: int) -> bytes:
        """One block's span by one range read, its length checked; ShardIndexError names a short one. Each member's
        header is checked when it is read (`_encoded_by_block`), which fetches a damaged block once more."""
        f = self.following
        assert f is not None
        shard, lo, hi = self.shard_names[int(f.shard[block])], int(f.lo[block]), int(f.hi[block])
        data = self._read(shard, lo, hi)
        if len(data) != hi - lo:
            raise ShardIndexError(
                f"{self.url}/{shard}: bytes [{lo}, {hi}) came back as {len(data)} bytes: the shard is truncated "
                "(or was rewritten after its index)"
            )
        return data

    def _plan(self, reads: _ProcessReads, following: Following, epoch: int, block: int) -> None:
        """On entering a window: fetch its blocks, then the next window's, in order, as far as the bound allows."""
        order = following.order
        if reads.positions[0] != epoch:
            positions = np.empty(len(order.starts), dtype=np.int64)
            positions[order.block_sequence(epoch)] = np.arange(len(order.starts))
            reads.positions = (epoch, positions)
        window = (epoch, int(reads.positions[1][block]) // order.window)
        if window <= reads.window:
            return
        reads.window = window
        current = [int(b) for b in order.window_blocks(*window)]
        after = following.next_window(*window)
        upcoming = [int(b) for b in order.window_blocks(*after)] if after else []
        reads.cache.prefetch(current + upcoming, keep=set(current))

    def _encoded_by_block(self, i: int, epoch: int, following: Following) -> bytes:
        reads = self._process_reads(following)
        block = following.order.block_of(i)
        self._plan(reads, following, epoch, block)
        shard = self.shard_names[int(following.shard[block])]
        offset, size = int(self.members[i]["offset"]), int(self.members[i]["size"])
        start, end = offset - HEADER - int(following.lo[block]), offset + size - int(following.lo[block])
        try:
            blob = reads.cache.read(block, start, end)
            self._check(i, shard, blob)
        except ShardIndexError as e:
            log.warning("fetching %s/%s again: %s", self.url, shard, e)
            reads.cache.drop(block)
            blob = reads.cache.read(block, start, end)  # a second failure is the store's: refused
            self._check(i, shard, blob)
        return blob

    def encoded(self, i: int, epoch: int | None = None) -> tuple[bytes, int]:
        """The encoded image of sample i and its class, checked against its tar header: by one range read, or from
        its block when the read is epoch `epoch`'s of a followed shard-local order on an object store."""
        if not 0 <= i < len(self.members):
            raise IndexError(f"sample {i} is outside the {len(self.members)} samples of {self.url}")
        label = int(self.members[i]["label"])
        following = self.following
        if following is not None and epoch is not None and self.remote:
            return self._encoded_by_block(i, epoch, following)[HEADER:], label
        shard = self.shard_names[int(np.searchsorted(self.starts, i, side="right")) - 1]
        offset, size = int(self.members[i]["offset"]), int(self.members[i]["size"])
        self.image_requests += 1
        blob = self._read(shard, offset - HEADER, offset + size)
        self._check(i, shard, blob)
        return blob[HEADER:], label

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        data, label = self.encoded(i)
        return decode.decode_rgb(data), label

    def __del__(self) -> None:
        for fd in getattr(self, "_open", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)
        reads: Any = getattr(self, "_reads", None)
        if reads is not None and reads.pid == os.getpid():
            with contextlib.suppress(Exception):
                reads.cache.close()
