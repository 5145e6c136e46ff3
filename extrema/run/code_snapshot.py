"""Which code a stage runs: the submission's snapshot (see `launch.runstore.snapshot`) or the installed packages, and
the check that a snapshot is what its id says before any of it runs.

A snapshot directory is `<id>/manifest.json` beside `<id>/files/{extrema,launch}/...` (with a copy of the manifest,
`files/extrema-snapshot.json`); a job imports from `files/` or from a copy of it (Ray's working_dir).

`verify` accepts a snapshot directory only when its manifest's names are relative paths inside the packages (no
`.` or `..` parts, no absolute paths), the directory holds those files and nothing else (bytecode caches aside) and
no links, every file has its listed sha256, the id is the hash of that list, and a directory laid out as
`<id>/files` is named by that id. Every process that imports this package from a snapshot runs `guard` as this
module is imported: before the stages and nearly all of the project's code, since every job imports it first
(`extrema.entry` directly; Slurm's and Ray's workers through `launch.backends.base` -> `extrema.run.contract` ->
`extrema.run.rundir`), and every requeue or retry is a new process that does so again. A snapshot that does not verify
stops the process with `extrema: code snapshot refused: <reason> (in <dir>)` and exit code 2 (the local backend
records that line as the stage's error). `identity()` says which code runs, for provenance.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

PACKAGES = ("extrema", "launch")
MANIFEST = "manifest.json"
FILES = "files"
INSIDE = "extrema-snapshot.json"  # the manifest again, inside files/: it travels with them (Ray's working_dir)
MAX_MANIFEST_BYTES = 4 << 20
MAX_FILES = 5_000
MAX_BYTES = 64 << 20  # the whole snapshot
ALLOW_CHANGE_ENV = "EXTREMA_ALLOW_CODE_CHANGE"
REFUSED = "code snapshot refused"
EXIT_REFUSED = 2  # contract.EXIT_USAGE, restated because contract imports this module (a test keeps them equal)
_DIGEST = re.compile(r"[0-9a-f]{64}")
_BYTECODE = re.compile(r"[^/]+\.pyc(\.\d+)?")  # with the temporary names Python writes a cache file under


class CodeChanged(Exception):
    """A stage would resume checkpoints written by other code than this attempt runs, and nobody allowed it."""


class SnapshotRefused(ValueError):
    """A snapshot that is not what its id says: a bad manifest or name, a link, a missing, extra or changed file."""


def snapshot_id(digests: dict[str, str]) -> str:
    """The content address of a set of files: path -> sha256 hex."""
    canonical = json.dumps(sorted(digests.items()), separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:20]


def check_name(name: object) -> str:
    """A manifest's file name, when it is a relative '/'-separated path inside the packages with no empty, `.`,
    `..` or `__pycache__` part and no backslash or control character; SnapshotRefused otherwise."""
    parts = name.split("/") if isinstance(name, str) else []
    if (
        not isinstance(name, str)
        or len(name) > 1000
        or len(parts) < 2
        or parts[0] not in PACKAGES
        or "\\" in name
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or any(p in ("", ".", "..", "__pycache__") for p in parts)
    ):
        raise SnapshotRefused(f"file name {name!r} is not a relative path inside {' or '.join(PACKAGES)}/")
    return name


def check_manifest(manifest: object, where: str) -> dict[str, Any]:
    """A parsed manifest whose names and digests are well-formed and whose id is the hash of them; SnapshotRefused
    naming `where` otherwise."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or not isinstance(files, dict) or not files:
        raise SnapshotRefused(f"{where}: not a snapshot manifest")
    if len(files) > MAX_FILES:
        raise SnapshotRefused(f"{where}: lists {len(files)} files, more than {MAX_FILES}")
    for name, digest in files.items():
        try:
            check_name(name)
        except SnapshotRefused as e:
            raise SnapshotRefused(f"{where}: {e}") from None
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise SnapshotRefused(f"{where}: the digest of {name} is not a sha256")
    if manifest.get("id") != snapshot_id(files):
        raise SnapshotRefused(f"{where}: its id {manifest.get('id')!r} does not match its files ({snapshot_id(files)})")
    return manifest


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """A manifest from its bytes (bounded size, plain JSON, checked by `check_manifest`)."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise SnapshotRefused(f"{where}: larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        manifest = json.loads(raw)
    except ValueError:
        raise SnapshotRefused(f"{where}: not JSON") from None
    return check_manifest(manifest, where)


def read_manifest(url: str) -> dict[str, Any]:
    """A snapshot manifest on any fsspec URL; SnapshotRefused (a ValueError) when it is missing or not valid."""
    from extrema.run import rundir

    fs, path = rundir.filesystem(url)
    try:
        raw = rundir.read_stable(fs, path, "rb", lambda f: f.read(MAX_MANIFEST_BYTES + 1))
    except FileNotFoundError:
        raise SnapshotRefused(f"{url}: no snapshot manifest (an incomplete snapshot)") from None
    return parse_manifest(raw, url)


def read_bounded(path: Path, limit: int) -> bytes:
    """A regular file's bytes (at most `limit` + 1), never through a link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise SnapshotRefused(f"{path} is not a regular file")
        return f.read(limit + 1)


def unlisted(files_dir: Path, listed: dict[str, str]) -> str | None:
    """Why `files_dir` holds more than the listed files and the inside manifest (a link, a device, an extra file;
    bytecode caches aside), or None."""
    entries = 0
    for dirpath, dirnames, filenames in os.walk(files_dir):
        cache = os.path.basename(dirpath) == "__pycache__"
        for name in dirnames + filenames:
            entries += 1
            if entries > 4 * MAX_FILES:
                return f"more than {4 * MAX_FILES} entries"
            path = os.path.join(dirpath, name)
            rel = Path(path).relative_to(files_dir).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                return f"{rel} is a link"
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                return f"{rel} is not a regular file"
            if rel != INSIDE and rel not in listed and not (cache and _BYTECODE.fullmatch(name)):
                return f"{rel} is not one of the snapshot's files"
    return None


def verify(files_dir: Path) -> dict[str, Any]:
    """The manifest of the snapshot directory `files_dir` once it holds exactly the files its manifest lists, with
    their listed content, under an id that matches them (and, laid out as `<id>/files`, its directory's name);
    SnapshotRefused (saying what is wrong, not where `files_dir` is) otherwise."""
    manifest = parse_manifest(read_bounded(files_dir / INSIDE, MAX_MANIFEST_BYTES), INSIDE)
    snap = manifest["id"]
    if files_dir.name == FILES:
        if files_dir.parent.name != snap:
            raise SnapshotRefused(f"it holds snapshot {snap} but its directory is named {files_dir.parent.name}")
        outer = files_dir.parent / MANIFEST
        if os.path.lexists(outer) and parse_manifest(read_bounded(outer, MAX_MANIFEST_BYTES), MANIFEST) != manifest:
            raise SnapshotRefused(f"{INSIDE} and ../{MANIFEST} differ")
    listed: dict[str, str] = manifest["files"]
    extra = unlisted(files_dir, listed)
    if extra is not None:
        raise SnapshotRefused(extra)
    for _ in checked_files(listed, lambda name: read_bounded(files_dir / name, MAX_BYTES)):
        pass
    return manifest


def checked_files(listed: dict[str, str], read: Callable[[str], bytes]) -> Iterator[tuple[str, bytes]]:
    """Each listed file (name, content) as `read` gives it (at most MAX_BYTES + 1 bytes), in name order, once its
    content matches its listed sha256 and the files so far stay within MAX_BYTES; SnapshotRefused (naming the file)
    otherwise, FileNotFoundError from `read` included."""
    total = 0
    for name, digest in sorted(listed.items()):
        try:
            data = read(name)
        except FileNotFoundError:
            raise SnapshotRefused(f"{name} is missing") from None
        total += len(data)
        if total > MAX_BYTES:
            raise SnapshotRefused(f"its files exceed {MAX_BYTES >> 20} MiB")
        if hashlib.sha256(data).hexdigest() != digest:
            raise SnapshotRefused(f"{name} differs from the snapshot's manifest (changed after it was taken)")
        yield name, data


def imported_from() -> Path:
    """The directory holding the `extrema` package this process imported (not resolved: a link in it counts)."""
    return Path(os.path.abspath(__file__)).parents[2]


def in_snapshot(here: Path) -> bool:
    """Whether `here` is (or claims to be) a snapshot's files directory."""
    return os.path.lexists(here / INSIDE) or (here.name == FILES and os.path.lexists(here.parent / MANIFEST))


def guard() -> None:
    """Stop this process (exit code 2, the reason on one line) when it imported this package from a snapshot that
    does not verify; a process running the installed packages goes on."""
    here = imported_from()
    if not in_snapshot(here):
        return
    try:
        verify(here)
    except (SnapshotRefused, OSError) as e:
        reason = " ".join(str(e).split())
        print(f"extrema: {REFUSED}: {reason} (in {here})", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_REFUSED) from None


def identity() -> dict[str, Any]:
    """{"code": snapshot id or None, "code_source": "snapshot" | "installed", "code_path": where it was imported
    from}, and for a snapshot the git sha and dirty flag of the tree it was taken from; a snapshot that no longer
    verifies (changed while this process ran: `guard` verified it at the start) is "snapshot (modified)"."""
    here = imported_from()
    if not in_snapshot(here):
        return {"code": None, "code_source": "installed", "code_path": str(here)}
    try:
        manifest = parse_manifest(read_bounded(here / INSIDE, MAX_MANIFEST_BYTES), INSIDE)
    except (SnapshotRefused, OSError) as e:
        return {"code": None, "code_source": f"unreadable snapshot: {e}", "code_path": str(here)}
    try:
        verify(here)
        source = "snapshot"
    except (SnapshotRefused, OSError):
        source = "snapshot (modified)"
    return {
        "code": manifest["id"],
        "code_source": source,
        "code_path": str(here),
        "git_sha": manifest.get("git_sha"),
        "git_dirty": bool(manifest.get("changed")) if manifest.get("git_sha") else None,
    }


def changes_on_resume(
    previous: dict[str, Any] | None, current: dict[str, Any], has_checkpoint: bool, allowed: bool, now: float
) -> list[dict[str, Any]]:
    """The stage's record of code changes after this attempt starts; CodeChanged when it would resume checkpoints
    written by other code and that was not allowed. `previous` is the last attempt's provenance (None: first)."""
    history = list(previous.get("code_changes") or []) if previous else []
    if not previous or "code_source" not in previous or not has_checkpoint:
        return history  # nothing to resume, or written before code was recorded
    before, after = previous.get("code"), current.get("code")
    if before == after and previous.get("code_source") == current.get("code_source"):
        return history

    def name(ident: dict[str, Any]) -> str:
        return f"snapshot {ident['code']}" if ident.get("code") else f"the {ident.get('code_source')} code"

    if not allowed:
        raise CodeChanged(
            f"this stage's checkpoints were written by {name(previous)}, this attempt runs {name(current)}; "
            "resuming would mix the two. Submit again with the code it started with, or with "
            "`extrema-launch sweep --allow-code-change` to resume anyway (recorded in its provenance)"
        )
    return [*history, {"from": before, "to": after, "allowed_at": now}]


guard()  # at import, so that a job refuses a changed snapshot before it runs more of it
