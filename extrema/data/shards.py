"""A map-style dataset over tar shards (extrema.data.shard_format) on any fsspec URL: one range request per image.

Start-up reads the split's index.json and members.bin (two requests); nothing lists individual images. Sample i
is read from its shard by one range request covering its tar header and data; the header is checked against the
index. Local shards are read with pread on file handles kept open per process; object stores get one GET.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict

import numpy as np
import torch
from fsspec.implementations.local import LocalFileSystem
from torch import Tensor
from torch.utils.data import Dataset

from extrema.data import decode
from extrema.data.object_store import DataSourceError, ProcessFs, access_error, missing_bucket
from extrema.data.shard_format import IMAGE_EXTENSIONS, ShardIndexError, join, member_header_name, read_index
from extrema.spec import StorageSpec

OPEN_FILES = 64  # local shard files kept open per process
HEADER = 512


class ShardedImages(Dataset[tuple[Tensor, int]]):
    """One split written by `extrema-launch data shard`: (uint8 RGB image, class) by global index."""

    def __init__(self, url: str, storage: StorageSpec | None = None, decoding: decode.Decoding | None = None) -> None:
        self.url = url
        self.decoding = decoding or decode.Decoding()
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
        self.shard_names = [s.name for s in index.shards]
        self.starts = index.starts
        self.members = index.members
        self.targets = torch.from_numpy(index.members["label"].astype(np.int64))
        self.requests = 0  # range reads made by this process (GETs on an object store)
        self._open: OrderedDict[str, int] = OrderedDict()

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # file descriptors stay with their process
        return state

    def __len__(self) -> int:
        return len(self.members)

    def _read(self, name: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of one shard file."""
        self.requests += 1
        fs = self.source.get()
        path = join(self.source.path, name)
        if not isinstance(fs, LocalFileSystem):
            data: bytes = fs.cat_file(path, start=start, end=end)
            return data
        fd = self._open.pop(path, None)  # inherited by forked workers: pread needs no shared file position
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self._open) >= OPEN_FILES:
                os.close(self._open.popitem(last=False)[1])
        self._open[path] = fd
        return os.pread(fd, end - start, start)

    def encoded(self, i: int) -> tuple[bytes, int]:
        """The encoded image of sample i and its class, by one range read checked against its tar header."""
        if not 0 <= i < len(self.members):
            raise IndexError(f"sample {i} is outside the {len(self.members)} samples of {self.url}")
        shard = self.shard_names[int(np.searchsorted(self.starts, i, side="right")) - 1]
        offset, size, label = (int(v) for v in self.members[i].tolist())
        blob = self._read(shard, offset - HEADER, offset + size)
        try:
            name, stored = member_header_name(blob[:HEADER])
        except ShardIndexError as e:
            name, stored = f"<{e}>", -1
        if stored != size or len(blob) != HEADER + size or not name.lower().endswith(IMAGE_EXTENSIONS):
            raise ShardIndexError(
                f"{self.url}/{shard}: sample {i} at byte {offset} is {name!r} of {stored} bytes, not the image of "
                f"{size} bytes the index says (a stale or foreign index)"
            )
        return blob[HEADER:], label

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        data, label = self.encoded(i)
        return decode.decode_rgb(data), label

    def __del__(self) -> None:
        for fd in getattr(self, "_open", {}).values():
            with contextlib.suppress(OSError):
                os.close(fd)
