"""Which code a stage runs: the submission's snapshot (see `launch.snapshot`) or the installed packages.

A snapshot directory is `<id>/manifest.json` beside `<id>/files/{extrema,launch}/...` (with a copy of the manifest,
`files/extrema-snapshot.json`); a job imports from `files/` or from a copy of it.
`identity()` looks at where this very package was imported from, so what it reports is what runs, not what a
variable claims, and checks every file against the manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FILES = "files"
INSIDE = "extrema-snapshot.json"  # the manifest again, inside files/: it travels with them (Ray's working_dir)
MAX_MANIFEST_BYTES = 4 << 20
ALLOW_CHANGE_ENV = "EXTREMA_ALLOW_CODE_CHANGE"


class CodeChanged(Exception):
    """A stage would resume checkpoints written by other code than this attempt runs, and nobody allowed it."""


def snapshot_id(digests: dict[str, str]) -> str:
    """The content address of a set of files: path -> sha256 hex."""
    canonical = json.dumps(sorted(digests.items()), separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()[:20]


def read_manifest(url: str) -> dict[str, Any]:
    """A snapshot manifest (bounded size, plain JSON); ValueError when it is missing or malformed."""
    from extrema import rundir

    fs, path = rundir.filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ValueError(f"{url}: no snapshot manifest (an incomplete snapshot)") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ValueError(f"{url}: larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    manifest = json.loads(raw)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("id") != snapshot_id(files):
        raise ValueError(f"{url}: not a snapshot manifest, or its id does not match its files")
    return manifest


def identity() -> dict[str, Any]:
    """{"code": snapshot id or None, "code_source": "snapshot" | "installed", "code_path": where it was imported
    from}, and for a snapshot the git sha and dirty flag of the tree it was taken from; a snapshot whose files were
    changed after it was taken is reported as "snapshot (modified)"."""
    here = Path(__file__).resolve().parent.parent  # the directory holding this `extrema` package
    manifest_path = here / INSIDE
    if not manifest_path.is_file():
        return {"code": None, "code_source": "installed", "code_path": str(here)}
    try:
        manifest = read_manifest(str(manifest_path))
    except ValueError as e:
        return {"code": None, "code_source": f"unreadable snapshot: {e}", "code_path": str(here)}
    intact = all(
        (here / p).is_file() and hashlib.sha256((here / p).read_bytes()).hexdigest() == d
        for p, d in manifest["files"].items()
    )
    source = "snapshot" if intact else "snapshot (modified)"
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
