"""The code a sweep submission runs: a content-addressed snapshot of the project's packages, taken at `sweep`.

The snapshot holds the `extrema` and `launch` packages as they are when `extrema-launch sweep` runs: in a git
checkout, every tracked file as it is in the working tree (uncommitted changes included) and every untracked file
git does not ignore; outside a checkout, the installed packages' files. Its id is a hash of every path and content,
so the same code is stored once: `<sweep>/code/<id>/manifest.json` (written last: a snapshot without it is
incomplete) beside `<sweep>/code/<id>/files/{extrema,launch}/...`, on any fsspec URL. Jobs import from a local
copy of `files/` (`local_copy`): the store itself when it is a local path, else a cache directory; either is
verified first (`code_snapshot.verify`), and a manifest with a name outside the packages is refused before anything
is written. Every job verifies its copy again when it starts (`extrema.run.code_snapshot.guard`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extrema.run import code_snapshot, rundir
from launch.inputs.errors import UsageError

PACKAGES = code_snapshot.PACKAGES
MAX_FILES = code_snapshot.MAX_FILES
MAX_BYTES = (
    code_snapshot.MAX_BYTES
)  # the whole snapshot; a tree larger than this is refused (something unexpected is in it)
GIT_TIMEOUT_S = 30.0


class SnapshotError(UsageError):
    """The source tree cannot be snapshotted (too large, unreadable, a name a snapshot cannot hold) or a stored
    snapshot is damaged or not what its id says."""


@dataclass(frozen=True)
class Snapshot:
    """The project's source at submission: relative path -> bytes, its id, and where it came from."""

    files: dict[str, bytes]
    git_sha: str | None = None
    changed: tuple[str, ...] = ()  # files that differ from the commit (modified, added, untracked)
    source: str = ""  # the directory the packages were read from
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """The content address of the snapshot."""
        return code_snapshot.snapshot_id(self.digests)


def source_root() -> Path:
    """The directory holding the `extrema` and `launch` packages this launcher runs from."""
    return Path(code_snapshot.__file__).resolve().parents[2]


def git(root: Path, *args: str) -> str | None:
    """stdout of a git command in `root`, or None when it is not a checkout or git is missing."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, timeout=GIT_TIMEOUT_S, check=False, text=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.decode(errors="surrogateescape") if out.returncode == 0 else None


def checkout_files(root: Path) -> list[str] | None:
    """The packages' files git tracks or would track (untracked, not ignored), when `root` is a checkout's top."""
    top = git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != root:
        return None
    listed = git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *PACKAGES)
    if listed is None:
        return None
    return sorted({p for p in listed.split("\0") if p and (root / p).is_file()})


def installed_files(root: Path) -> list[str]:
    """The packages' files under `root` (outside a checkout), without bytecode caches."""
    out = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix not in (".pyc", ".pyo"):
                out.append(path.relative_to(root).as_posix())
    return out


def changed_files(root: Path) -> tuple[str, ...]:
    """The packages' files that differ from the checkout's commit (empty outside a checkout)."""
    status = git(root, "status", "--porcelain", "-z", "--untracked-files=all", "--", *PACKAGES)
    if not status:
        return ()
    out, entries = set(), iter(status.split("\0"))
    for entry in entries:
        if len(entry) > 3:
            out.add(entry[3:])
            if entry[0] in "RC":  # a rename or copy: its source path follows as an entry of its own
                next(entries, None)
    return tuple(sorted(out))


def take(root: Path | None = None) -> Snapshot:
    """Read the packages' source under `root` (the launcher's own by default) into a snapshot."""
    root = (root or source_root()).resolve()
    listed = checkout_files(root)
    in_checkout = listed is not None
    paths = listed if listed is not None else installed_files(root)
    if not paths:
        raise SnapshotError(f"no source files of {', '.join(PACKAGES)} found under {root}")
    if len(paths) > MAX_FILES:
        raise SnapshotError(f"{root}: {len(paths)} files in {', '.join(PACKAGES)}, more than {MAX_FILES}")
    files: dict[str, bytes] = {}
    total = 0
    for p in paths:
        try:
            code_snapshot.check_name(p)
        except code_snapshot.SnapshotRefused as e:
            raise SnapshotError(f"{root}: {e}") from None
        data = (root / p).read_bytes()
        total += len(data)
        if total > MAX_BYTES:
            raise SnapshotError(f"{root}: the packages' files exceed {MAX_BYTES >> 20} MiB")
        files[p] = data
    digests = {p: hashlib.sha256(d).hexdigest() for p, d in files.items()}
    sha = git(root, "rev-parse", "HEAD") if in_checkout else None
    changed = changed_files(root) if in_checkout else ()
    return Snapshot(files, sha.strip() if sha else None, changed, str(root), digests)


def code_url(sweep_url: str, snapshot_id: str) -> str:
    """Where a snapshot lives in the run store."""
    return rundir.join(sweep_url, "code", snapshot_id)


def save(snapshot: Snapshot, sweep_url: str) -> str:
    """Store the snapshot under the sweep (once: an existing complete copy is kept); its URL."""
    url = code_url(sweep_url, snapshot.id)
    manifest_url = rundir.join(url, code_snapshot.MANIFEST)
    if rundir.exists(manifest_url):
        return url
    fs, _ = rundir.filesystem(url)
    for path, data in snapshot.files.items():
        target = rundir.filesystem(rundir.join(url, code_snapshot.FILES, path))[1]
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        with fs.open(target, "wb") as f:
            f.write(data)
    manifest = {
        "id": snapshot.id,
        "files": snapshot.digests,
        "git_sha": snapshot.git_sha,
        "changed": list(snapshot.changed),
        "source": snapshot.source,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True)
    rundir.write_text_atomic(rundir.join(url, code_snapshot.FILES, code_snapshot.INSIDE), text)
    rundir.write_text_atomic(manifest_url, text)
    return url


def local_copy(url: str, cache: Path) -> Path:
    """A verified local directory to import the snapshot at `url` from: its own `files/` when the store is local,
    else a copy under `cache/<id>/` (fetched once into a fresh directory, verified, then renamed into place).
    SnapshotError when the manifest, a name, a file, the id or the directory's name is not what it should be."""
    try:
        manifest = code_snapshot.read_manifest(rundir.join(url, code_snapshot.MANIFEST))
    except code_snapshot.SnapshotRefused as e:
        raise SnapshotError(str(e)) from None
    snapshot_id = manifest["id"]
    if url.rstrip("/").rsplit("/", 1)[-1] != snapshot_id:
        raise SnapshotError(f"{url}: holds snapshot {snapshot_id}, not the one its directory is named after")
    local = rundir.local_path(rundir.join(url, code_snapshot.FILES))
    if local is not None:
        return verified(Path(local), f"remove {url} and submit again to store this code afresh")
    target = cache / snapshot_id
    if os.path.lexists(target / code_snapshot.MANIFEST):
        return verified(target / code_snapshot.FILES, f"remove {target} to fetch it again")
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{snapshot_id}-", dir=cache))
    try:
        fetch(url, manifest, staging / snapshot_id)
        verified(staging / snapshot_id / code_snapshot.FILES)
        if os.path.lexists(target) and not os.path.lexists(target / code_snapshot.MANIFEST):
            shutil.rmtree(target)  # an incomplete copy: the manifest is written last
        with contextlib.suppress(OSError):  # another process may have put its copy in place first
            (staging / snapshot_id).rename(target)
    except OSError as e:
        raise SnapshotError(f"{url}: cannot copy it to {cache}: {e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return verified(target / code_snapshot.FILES)


def fetch(url: str, manifest: dict[str, Any], into: Path) -> None:
    """Copy the listed files of the snapshot at `url` into the new directory `into` (files/, then the manifests);
    every name was checked by `code_snapshot.read_manifest`, and every file is created, never opened through a link."""
    into.mkdir()
    fs, _ = rundir.filesystem(url)

    def read(path: str) -> bytes:
        where = rundir.filesystem(rundir.join(url, code_snapshot.FILES, path))[1]
        return bytes(rundir.read_stable(fs, where, "rb", lambda f: f.read(MAX_BYTES + 1)))

    try:
        for path, data in code_snapshot.checked_files(manifest["files"], read):
            dest = into / code_snapshot.FILES / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            with open(dest, "xb") as out:
                out.write(data)
    except code_snapshot.SnapshotRefused as e:
        raise SnapshotError(f"{url}: {e}") from None
    text = json.dumps(manifest, indent=2, sort_keys=True)
    (into / code_snapshot.FILES / code_snapshot.INSIDE).write_text(text)
    (into / code_snapshot.MANIFEST).write_text(text)


def verified(files_dir: Path, remedy: str = "") -> Path:
    """`files_dir` once `code_snapshot.verify` accepts it; SnapshotError (with the remedy, when given) otherwise."""
    try:
        code_snapshot.verify(files_dir)
    except (code_snapshot.SnapshotRefused, OSError) as e:
        raise SnapshotError(
            f"{code_snapshot.REFUSED}: {e} (in {files_dir})" + (f"; {remedy}" if remedy else "")
        ) from None
    return files_dir


def default_cache() -> Path:
    """Where snapshots fetched from object stores are kept on this machine."""
    base = os.environ.get("EXTREMA_CODE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "extrema", "code")
    return Path(base)
