"""The sweep a command line addresses (a sweep file or a run-store URL), and the exit codes every command shares."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from launch.inputs.errors import DamagedStore, UsageError
from launch.reconcile import Reconciled
from launch.runstore import results, roots, store
from launch.sweepfile.earlier_ids import under_earlier_ids
from launch.sweepfile.expand import load_runs
from launch.sweepfile.model import LauncherSpec, SweepFile

OK, FAILED, USAGE, DAMAGED, INTERRUPTED = 0, 1, 2, 3, 130
FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json"}


@dataclass
class Addressed:
    """The sweep a command line addresses: its store URL, its runs and launcher, and the file if any."""

    url: str
    runs: list[store.StoredRun]
    launcher: LauncherSpec
    manifest: dict[str, Any] | None
    sweep: SweepFile | None = None
    problems: list[str] = field(default_factory=list)  # `path: reason` of unreadable records met on the way


def is_sweep_file(arg: str) -> bool:
    """Whether a FILE|URL argument names a sweep YAML file rather than a run-store URL."""
    return arg.endswith((".yaml", ".yml")) or ("://" not in arg and Path(arg).is_file())


def open_addressed(arg: str, root: str | None = None, overrides: Sequence[str] = ()) -> Addressed:
    """Resolve FILE|URL into the sweep it addresses (a file with its `key=value` overrides:
    launch.sweepfile.overrides)."""
    if is_sweep_file(arg):
        sweep, runs = load_runs(arg, root=root, overrides=overrides)
        url = store.sweep_url(sweep.root, sweep.name)
        roots.check_usable(url, write=False)
        try:
            manifest = store.read_manifest(url)
        except store.Unreadable as e:  # the file says what the runs are; the manifest only adds job records
            return Addressed(url, [r.stored() for r in runs], sweep.launcher, None, sweep, [str(e)])
        listed = [r.stored() for r in under_earlier_ids(runs, held_run_ids(manifest))]
        return Addressed(url, listed, sweep.launcher, manifest, sweep)
    try:
        url = store.normalize_root(arg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    roots.check_usable(url, write=False)
    try:
        manifest = store.read_manifest(url)
    except ValueError as e:
        raise UsageError(str(e)) from None
    except store.Unreadable as e:
        raise DamagedStore(f"{e} (give the sweep file instead of the URL to see its runs)") from None
    if manifest is None:
        raise UsageError(f"{arg}: not a sweep file, and no {store.MANIFEST} there")
    try:
        launcher = LauncherSpec.model_validate(manifest.get("launcher", {}))
        return Addressed(url, store.stored_runs_of(url, manifest), launcher, manifest)
    except store.Unreadable as e:
        raise DamagedStore(str(e)) from None
    except ValidationError as e:
        raise DamagedStore(f"{url}/{store.MANIFEST}: malformed launcher ({e.error_count()} problems)") from None


def held_run_ids(manifest: dict[str, Any] | None) -> list[str]:
    """The run ids a sweep's manifest lists (none when it has no manifest or its run list is malformed)."""
    runs = (manifest or {}).get("runs", [])
    return [r["run_id"] for r in runs if isinstance(r, dict) and isinstance(r.get("run_id"), str)]


def swept_axes(runs: Sequence[store.StoredRun]) -> list[str]:
    """Every swept dotted path of the runs, in first-seen order."""
    return list(dict.fromkeys(p for r in runs for p in results.flatten(r.overrides)))


def print_notes(out: Console, seen: Reconciled) -> None:
    """Print the notes on backends that could not be asked."""
    for note in seen.notes:
        out.print(Text(note, style="yellow"), soft_wrap=True)


def print_unreadable(out: Console, problems: Sequence[str]) -> None:
    """List every unreadable record of the run store with its path and reason (the other rows were shown)."""
    if not problems:
        return
    out.print(Text(f"{len(problems)} unreadable record(s) in the run store (their rows are held back):", style="red"))
    for p in problems:
        out.print(Text(f"  {p}", style="red"), soft_wrap=True, markup=False, highlight=False)
