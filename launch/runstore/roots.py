"""Run-store roots: which URLs may be one (refused at validation, with the reason) and whether one can be used.

`normalized()` checks the text of a root and that fsspec has a backend for its protocol (naming the package that
provides a missing one). `check_usable()` looks at the store before anything is written: a store that cannot be
reached, or whose path is a file, is refused, and so is one that is not writable when a sweep is to be written.
Both refuse with one line naming the root and the cause.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import known_implementations

from launch.inputs.errors import UsageError
from launch.inputs.printable import clip, shown

LOCAL_PROTOCOLS = ("file", "local")
READ_ONLY_PROTOCOLS = ("http", "https")  # fsspec reads them; a sweep cannot be written there
PROBE_TIMEOUT_S = 20.0  # how long a store may take to answer whether the sweep's directory exists
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PROTOCOL = re.compile(r"[a-z][a-z0-9+.-]*", re.IGNORECASE)


def protocol(root: str) -> str | None:
    """The protocol of a URL (`s3` of `s3://bucket/x`), or None for a local path."""
    return root.split("://", 1)[0] if "://" in root else None


def is_local(root: str) -> bool:
    """Whether a root is on this machine's filesystem (a path or a file:// URL)."""
    return protocol(root) in (None, *LOCAL_PROTOCOLS)


def backend_problem(proto: str) -> str | None:
    """Why fsspec cannot open URLs of a protocol here (unknown, or its package not installed); None when it can."""
    if not _PROTOCOL.fullmatch(proto):
        return f"{shown(proto)} is not a protocol name"
    try:
        fsspec.get_filesystem_class(proto)
    except ValueError:
        return f"fsspec knows no protocol {proto!r} (known ones include file, s3, gs, az, hdfs, http, memory)"
    except ImportError as e:
        package = str(known_implementations.get(proto, {}).get("class", "")).split(".", 1)[0]
        if package and package != "fsspec":
            return (
                f"the {proto}:// protocol needs the package {package}, which is not installed (pip install {package})"
            )
        return f"the {proto}:// protocol cannot be used here: {clip(str(e))}"
    except Exception as e:  # a backend package that is installed but broken
        return f"the fsspec backend of {proto}:// does not load: {type(e).__name__}: {clip(str(e))}"
    return None


def normalized(root: str) -> str:
    """The run-store root as a URL or an absolute local path without a trailing '/'; ValueError saying why not."""
    if not root or _CONTROL.search(root):
        raise ValueError(f"root {shown(root)} is empty or contains control characters")
    proto = protocol(root)
    if proto is None:
        path = os.path.abspath(os.path.expanduser(root))
        if path == "/":
            raise ValueError(f"root {root!r} is the filesystem root: give a directory for the run store, e.g. ./runs")
        return path.rstrip("/")
    reason = backend_problem(proto)
    if reason:
        raise ValueError(f"root {shown(root)}: {reason}")
    rest = root.split("://", 1)[1]
    if proto in LOCAL_PROTOCOLS and not rest.startswith("/"):
        what = "no path" if not rest else "a relative path or a host"
        raise ValueError(f"root {shown(root)} has {what}: a {proto}:// root is {proto}:///absolute/path")
    if not rest.strip("/"):
        where = "the filesystem root" if proto in LOCAL_PROTOCOLS else f"no location after {proto}://"
        raise ValueError(f"root {shown(root)} names {where}: give a directory for the run store")
    return root.rstrip("/")


def _answer(fn: Any, timeout_s: float) -> Any:
    """fn() in a daemon thread; TimeoutError when it has not returned in time (the thread is left behind)."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"no answer in {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _deepest_existing(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, dict[str, Any] | None]:
    """The path or its nearest ancestor that exists, with its info (None when none does)."""
    for _ in range(256):
        try:
            return path, fs.info(path)
        except (FileNotFoundError, NotADirectoryError) as e:
            cause = e.__cause__  # fsspec's http backend reports a refused connection as "not found"
            missing = isinstance(cause, (FileNotFoundError, NotADirectoryError)) or getattr(cause, "status", 0) == 404
            if cause is not None and not missing:
                raise cause from None
            parent = fs._parent(path)
            if not parent or parent == path:
                return path, None
            path = parent
    return path, None


def check_usable(url: str, write: bool, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """UsageError unless the sweep URL's store answers, its path is not a file and, with `write`, a local store can
    be written there. Reads only; nothing is created."""
    try:
        fs, path = fsspec.core.url_to_fs(url)
        where, info = _answer(lambda: _deepest_existing(fs, path), timeout_s)
    except Exception as e:
        raise UsageError(f"run store {url}: cannot be reached: {type(e).__name__}: {clip(str(e), 160)}") from None
    web = protocol(url) in READ_ONLY_PROTOCOLS
    if web and write:
        raise UsageError(f"run store {url}: fsspec cannot write over {protocol(url)}://; give a writable root")
    if info is not None and info.get("type") != "directory" and not web:  # web servers have no directories
        raise UsageError(f"run store {url}: {where} is a file, not a directory")
    if write and isinstance(fs, LocalFileSystem) and info is not None and not os.access(where, os.W_OK | os.X_OK):
        raise UsageError(f"run store {url}: {where} is not writable (read-only filesystem or no permission)")
