"""Files of a run directory on any fsspec URL: URLs, atomic writes, standard JSON and JSON lines. Torch-free; a leaf."""

from __future__ import annotations

import json
import math
import os
import re
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path with '/'."""
    out = url.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of a URL and the path inside it."""
    fs, path = url_to_fs(url)
    return fs, path


def local_path(url: str) -> str | None:
    """The path of a URL on this machine's filesystem (a plain path or file://), else None."""
    fs, path = filesystem(url)
    return str(path) if isinstance(fs, LocalFileSystem) else None


def fresh_names(url: str, pattern: re.Pattern[str]) -> list[str]:
    """Sorted names of the entries directly in the folder at `url` that match `pattern`, from a listing made now
    (never a cached one: other processes add entries); [] when there is no such folder."""
    fs, path = filesystem(url)
    fs.invalidate_cache(path)
    try:
        names = [str(e).rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(path, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if pattern.fullmatch(n))


def exists(url: str) -> bool:
    """Whether a file or directory exists at the URL."""
    fs, path = filesystem(url)
    return bool(fs.exists(path))


def write_text_atomic(url: str, text: str) -> None:
    """Write text so that readers see either the old or the new file, never a partial one."""
    fs, path = filesystem(url)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "w") as f:
        f.write(text)
    fs.mv(tmp, path)


NONFINITE = ".nonfinite"  # beside a number that was not finite (stored as null): "nan", "inf" or "-inf"


def finite_json(obj: Any) -> Any:
    """`obj` as standard JSON allows it: a non-finite float becomes null, and in an object the key
    `<key>.nonfinite` beside it keeps what it was ("nan", "inf", "-inf"); lists and nested objects alike."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out[k] = finite_json(v)
            if isinstance(v, float) and not math.isfinite(v):
                out[f"{k}{NONFINITE}"] = str(v)
        return out
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """Standard JSON text (never NaN or Infinity tokens: `finite_json`); keyword arguments as json.dumps."""
    return json.dumps(finite_json(obj), allow_nan=False, default=str, **kwargs)


T = TypeVar("T")
STABLE_READS = 5  # opens of one object that another writer keeps replacing, before its error stands


def read_stable(fs: fsspec.AbstractFileSystem, path: str, mode: str, read: Callable[[Any], T]) -> T:
    """`read` applied to `path` opened in `mode`, opened again when an object store says the object was replaced
    between the open and the read (s3fs's FileExpired: another host rewrote it, as hosts sharing a run store do)."""
    for attempt in range(STABLE_READS):
        try:
            with fs.open(path, mode) as f:
                return read(f)
        except OSError as e:
            if type(e).__name__ != "FileExpired" or attempt == STABLE_READS - 1:
                raise
            fs.invalidate_cache(path)
    raise AssertionError("unreachable")


def write_json(url: str, obj: Any) -> None:
    """Write a JSON document atomically, as standard JSON (`dumps`)."""
    write_text_atomic(url, dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(url: str) -> Any | None:
    """Read a JSON document, or None when it does not exist."""
    fs, path = filesystem(url)
    try:
        return read_stable(fs, path, "r", json.load)
    except FileNotFoundError:
        return None


def read_jsonl(url: str) -> list[dict[str, Any]]:
    """Read every complete line of a JSON-lines file; [] when it does not exist."""
    fs, path = filesystem(url)
    try:
        lines = read_stable(fs, path, "r", lambda f: f.read().splitlines())
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # a line cut by a crash, or nested past the parser's depth
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def ends_a_line(path: str) -> bool:
    """Whether a file is empty, missing or ends with a newline (a killed writer leaves a partial last line)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() == 0:
                return True
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"
    except FileNotFoundError:
        return True
