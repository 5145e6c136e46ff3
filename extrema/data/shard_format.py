"""Tar shards of an image dataset (webdataset layout) with an index for random access. Torch-free.

A split directory holds `shard-000000.tar`, `shard-000001.tar`, ... whose members are `<key>.<ext>` (the image
file's bytes, its extension kept) and `<key>.cls` (the class index in ASCII), `index.json` (format, classes,
each shard's name, byte size and sample count) and `members.bin` (per sample, in dataset order: the byte offset
and size of its image inside its shard and its class; little-endian, 16 bytes a row). Sample i of the shards is
sample i of the ImageFolder they were written from (classes sorted, files sorted), so both give the same data.

Any webdataset reader can stream the tars; the index lets a map-style dataset read one sample by one range
request, which keeps sample order and augmentation a function of (seed, epoch, index).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fsspec import AbstractFileSystem

FORMAT = "extrema-shards"
VERSION = 1
INDEX = "index.json"
MEMBERS = "members.bin"
MEMBER_DTYPE = np.dtype([("offset", "<u8"), ("size", "<u4"), ("label", "<i4")])
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
MAX_INDEX_BYTES = 64 * 2**20  # index.json: classes and shard list (ImageNet-1k at 1 GB shards: ~100 KB)
MAX_MEMBER_BYTES = 256 * 2**20  # one image
MAX_SAMPLES = 2**31 - 1
MAX_CLASSES = 1_000_000
SHARD_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\.tar")
CLASS_NAME = re.compile(r"[^\x00-\x1f\x7f/\\]{1,255}")
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


class ShardIndexError(ValueError):
    """A shard index that is missing, too large, malformed or inconsistent with its shards."""


@dataclass(frozen=True)
class Shard:
    """One tar file of a split: its file name, byte size and number of samples."""

    name: str
    bytes: int
    count: int


@dataclass(frozen=True)
class ShardIndex:
    """What a split's index says: class names, shards in order, and one member row per sample."""

    classes: list[str]
    shards: list[Shard]
    members: np.ndarray  # MEMBER_DTYPE rows, dataset order

    @property
    def starts(self) -> np.ndarray:
        """Global index of each shard's first sample (int64, one per shard)."""
        counts = np.array([s.count for s in self.shards], dtype=np.int64)
        return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def parse_size(text: str) -> int:
    """'1GB', '512MiB', '100000' -> bytes (decimal units, binary with 'i')."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 1GB, 512MB, 64MiB)")
    size = int(float(m.group(1)) * UNITS[unit])
    if size < 1:
        raise ValueError(f"size {text!r} must be at least one byte")
    return size


def join(root: str, *parts: str) -> str:
    """root/part/... for fsspec paths and URLs."""
    return "/".join([root.rstrip("/"), *parts])


def read_bounded(fs: AbstractFileSystem, path: str, limit: int, what: str) -> bytes:
    """A whole file, refused when larger than `limit` bytes (checked before and after reading)."""
    try:
        size = int(fs.size(path))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} {path!r} does not exist") from e
    if size > limit:
        raise ValueError(f"{what} {path!r} is {size} bytes; more than the limit of {limit}")
    data: bytes = fs.cat_file(path, start=0, end=limit + 1) if size else b""
    if len(data) > limit:
        raise ValueError(f"{what} {path!r} grew past the limit of {limit} bytes while read")
    return data


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise ShardIndexError(f"{what}: {value!r} is not an integer in [{lo}, {hi}]")
    return value


def parse_index(raw: bytes, members: Callable[[int], bytes], where: str) -> ShardIndex:
    """Validate index.json bytes and the member table (read by `members(expected_bytes)`) into a ShardIndex."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardIndexError(f"{where}/{INDEX} is not JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ShardIndexError(f"{where}/{INDEX} is not an {FORMAT} v{VERSION} index")
    classes, shards = doc.get("classes"), doc.get("shards")
    if not isinstance(classes, list) or not 0 < len(classes) <= MAX_CLASSES:
        raise ShardIndexError(f"{where}/{INDEX}: classes must be a non-empty list")
    if not all(isinstance(c, str) and CLASS_NAME.fullmatch(c) for c in classes) or len(set(classes)) < len(classes):
        raise ShardIndexError(f"{where}/{INDEX}: class names must be distinct printable names without '/'")
    if not isinstance(shards, list) or not shards:
        raise ShardIndexError(f"{where}/{INDEX}: shards must be a non-empty list")
    parsed: list[Shard] = []
    for k, s in enumerate(shards):
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not SHARD_NAME.fullmatch(s["name"]):
            raise ShardIndexError(f"{where}/{INDEX}: shards[{k}] needs a plain file name like shard-000000.tar")
        parsed.append(
            Shard(
                s["name"],
                _int(s.get("bytes"), f"{where}/{INDEX}: shards[{k}].bytes", 1024, 2**50),
                _int(s.get("count"), f"{where}/{INDEX}: shards[{k}].count", 1, MAX_SAMPLES),
            )
        )
    if len({s.name for s in parsed}) < len(parsed):
        raise ShardIndexError(f"{where}/{INDEX}: shard names repeat")
    total = sum(s.count for s in parsed)
    if total > MAX_SAMPLES:
        raise ShardIndexError(f"{where}/{INDEX}: {total} samples is more than {MAX_SAMPLES}")
    table = members(total * MEMBER_DTYPE.itemsize)
    if len(table) != total * MEMBER_DTYPE.itemsize:
        raise ShardIndexError(
            f"{where}/{MEMBERS} has {len(table)} bytes; the index's {total} samples need "
            f"{total * MEMBER_DTYPE.itemsize}"
        )
    rows = np.frombuffer(table, dtype=MEMBER_DTYPE).copy()
    index = ShardIndex(list(classes), parsed, rows)
    shard_bytes = np.repeat(np.array([s.bytes for s in parsed], dtype=np.uint64), [s.count for s in parsed])
    if len(rows) and (
        (rows["label"] < 0).any()
        or (rows["label"] >= len(classes)).any()
        or (rows["offset"] < 512).any()
        or (rows["size"] > MAX_MEMBER_BYTES).any()
        or (rows["offset"] + rows["size"].astype(np.uint64) > shard_bytes).any()
    ):
        raise ShardIndexError(f"{where}/{MEMBERS}: a row lies outside its shard, or its label or size is invalid")
    return index


def read_index(fs: AbstractFileSystem, split_path: str) -> ShardIndex:
    """Read and validate a split's index.json and members.bin (two requests, each size-bounded)."""

    def bounded(name: str, limit: int, what: str) -> bytes:
        try:
            return read_bounded(fs, join(split_path, name), limit, what)
        except ValueError as e:
            raise ShardIndexError(str(e)) from e

    raw = bounded(INDEX, MAX_INDEX_BYTES, "shard index")
    return parse_index(raw, lambda expected: bounded(MEMBERS, expected, "shard member table"), split_path)


def member_header_name(header: bytes) -> tuple[str, int]:
    """(name, size) of the 512-byte tar header in front of a member's data; ShardIndexError when it is none."""
    try:
        info = tarfile.TarInfo.frombuf(header, tarfile.ENCODING, "surrogateescape")
    except tarfile.HeaderError as e:
        raise ShardIndexError(f"no tar header where the index puts one ({e})") from e
    return info.name, info.size


# ----------------------------------------------------------------------------------------------------- Writing


def list_image_folder(fs: AbstractFileSystem, split_path: str) -> tuple[list[str], list[tuple[str, int]]]:
    """(sorted class names, [(file path, class index)] sorted by path): the ImageFolder order of a split."""
    root = split_path.rstrip("/")
    if not fs.isdir(root):
        raise FileNotFoundError(f"image folder split directory {root!r} does not exist")
    dirs = [e["name"].rstrip("/") for e in fs.ls(root, detail=True) if e["type"] == "directory"]
    classes = sorted(d.rsplit("/", 1)[-1] for d in dirs)
    if not classes:
        raise FileNotFoundError(f"image folder {root!r} has no class subdirectories (<class>/<image> expected)")
    index = {c: i for i, c in enumerate(classes)}
    samples: list[tuple[str, int]] = []
    for f in sorted(fs.find(root)):
        rel = f[len(root) :].lstrip("/") if f.startswith(root) else f
        cls, _, rest = rel.partition("/")
        if rest and cls in index and f.lower().endswith(IMAGE_EXTENSIONS):
            samples.append((f, index[cls]))
    return classes, samples


def member_extension(path: str) -> str:
    """The member extension webdataset readers key on: the file's, lower-cased, 'jpeg' as 'jpg'."""
    ext = path.rsplit(".", 1)[-1].lower()
    return "jpg" if ext == "jpeg" else ext


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> int:
    """Append one member; returns the byte offset of its data in the archive."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    tar.addfile(info, io.BytesIO(data))
    return tar.offset - -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


@dataclass
class ShardWriter:
    """Writes samples into numbered tar shards of about `shard_bytes` each, then the split's index."""

    fs: AbstractFileSystem
    split_path: str
    shard_bytes: int

    def __post_init__(self) -> None:
        self.shards: list[Shard] = []
        self.rows: list[tuple[int, int, int]] = []
        self._file: Any = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        size = self._file.tell()
        self._file.close()
        self.shards.append(Shard(f"shard-{len(self.shards):06d}.tar", size, self._count))
        self._tar, self._count = None, 0

    def add(self, image: bytes, ext: str, label: int) -> None:
        """Append one sample as `<key>.<ext>` + `<key>.cls`; starts a new shard once the current one is full."""
        if len(image) > MAX_MEMBER_BYTES:
            raise ValueError(f"image {len(self.rows)} is {len(image)} bytes; the limit is {MAX_MEMBER_BYTES}")
        if self._tar is not None and self._tar.offset + len(image) > self.shard_bytes:
            self._close_shard()
        if self._tar is None:
            self.fs.makedirs(self.split_path, exist_ok=True)
            name = join(self.split_path, f"shard-{len(self.shards):06d}.tar")
            self._file = self.fs.open(name, "wb")  # closed in _close_shard: a shard spans many add() calls
            self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        key = f"{len(self.rows):09d}"
        offset = _add(self._tar, f"{key}.{ext}", image)
        _add(self._tar, f"{key}.cls", str(label).encode())
        self.rows.append((offset, len(image), label))
        self._count += 1

    def finish(self, classes: list[str]) -> ShardIndex:
        """Close the last shard and write members.bin, then index.json (the index last: it marks the split done)."""
        self._close_shard()
        if not self.shards:
            raise ValueError(f"no samples were written to {self.split_path}")
        table = np.array(self.rows, dtype=MEMBER_DTYPE)
        self.fs.pipe_file(join(self.split_path, MEMBERS), table.tobytes())
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "classes": classes,
            "samples": len(table),
            "shards": [{"name": s.name, "bytes": s.bytes, "count": s.count} for s in self.shards],
        }
        self.fs.pipe_file(join(self.split_path, INDEX), json.dumps(doc, indent=1).encode())
        return ShardIndex(classes, list(self.shards), table)


def shard_image_folder(
    src_fs: AbstractFileSystem,
    src_split: str,
    dst_fs: AbstractFileSystem,
    dst_split: str,
    shard_bytes: int,
    progress: Callable[[int, int], None] | None = None,
) -> ShardIndex:
    """Write one ImageFolder split as tar shards with their index, in ImageFolder order."""
    classes, samples = list_image_folder(src_fs, src_split)
    for name in classes:
        if not CLASS_NAME.fullmatch(name):
            raise ValueError(f"class directory name {name!r} cannot go into a shard index")
    writer = ShardWriter(dst_fs, dst_split, shard_bytes)
    for k, (path, label) in enumerate(samples):
        writer.add(read_bounded(src_fs, path, MAX_MEMBER_BYTES, "image"), member_extension(path), label)
        if progress is not None:
            progress(k + 1, len(samples))
    return writer.finish(classes)
