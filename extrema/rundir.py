"""Files of a run directory on any fsspec URL: atomic JSON, the metrics log, provenance. Torch-free."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from extrema import code, environment

PROVENANCE_PACKAGES = ("extrema", "torch", "torchvision", "numpy", "pydantic", "fsspec", "pyarrow", "submitit", "ray")


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


def write_json(url: str, obj: Any) -> None:
    """Write a JSON document atomically, as standard JSON (`dumps`)."""
    write_text_atomic(url, dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(url: str) -> Any | None:
    """Read a JSON document, or None when it does not exist."""
    fs, path = filesystem(url)
    try:
        with fs.open(path, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def read_jsonl(url: str) -> list[dict[str, Any]]:
    """Read every complete line of a JSON-lines file; [] when it does not exist."""
    fs, path = filesystem(url)
    try:
        with fs.open(path, "r") as f:
            lines = f.read().splitlines()
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


class MetricsLog:
    """An append-only JSON-lines log. On a filesystem each record is appended (a write of one line, whatever the
    log's length); on an object store, which cannot append, the whole log is rewritten atomically on flush."""

    def __init__(self, url: str, keep_after_step: int | None = None) -> None:
        from extrema import trackers

        self.url = url
        self.local = local_path(url)
        self.records = read_jsonl(url)
        self.trackers = trackers.active()  # TensorBoard / W&B of this stage, when its spec asks for them
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


def git_state(repo: Path | None = None) -> dict[str, Any]:
    """Git sha and dirty flag of the source tree; outside a checkout, EXTREMA_GIT_SHA (set by the image) or nulls."""
    cwd = repo or Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd,
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
        )
        return {"git_sha": sha, "git_dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": os.environ.get("EXTREMA_GIT_SHA"), "git_dirty": None}


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that change results."""
    out: dict[str, str | None] = {}
    for name in PROVENANCE_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(world_size: int, ranks: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything needed to say where a result came from; `ranks`: every rank's {"rank", "host", "pid"}."""
    from extrema import contract

    ranks = ranks or [contract.this_process()]
    ident = code.identity()
    return {
        **(git_state() if ident["code"] is None else {}),
        **environment.describe(),
        **ident,
        "packages": package_versions(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "world_size": world_size,
        "hosts": list(dict.fromkeys(str(r["host"]) for r in ranks)),
        "ranks": ranks,
    }
