"""`extrema-launch rm`: remove whole runs of a sweep (directories, manifest entries, ledger records), confirmed."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.text import Text

from extrema.run import contract, lease
from launch.addressed import FAILED, OK
from launch.cli.arguments import RUN_HELP, add_command, run_named
from launch.cli.listed import add_store_target, check_writable, listed_target
from launch.inputs.errors import DamagedStore, UsageError
from launch.runstore import disk_usage, run_removal, store
from launch.runstore.disk_usage import Found
from launch.views import disk_view

HELP = "remove whole runs of a sweep: their directories, manifest entries and ledger records"
MORE = (
    "Asks for a typed `yes` on a terminal; without one, --yes is required. Refused (exit 2, nothing removed) while\n"
    "a stage of a run is held by a live attempt, or is pending, running or preempted on its backend (`cancel` it\n"
    "first). Each stage's lease is taken (no waiting) while it is removed, so no attempt starts there meanwhile.\n"
    "Afterwards `status`, `results` and `report` of the store URL no longer show the runs; those of the sweep file\n"
    "show them not submitted (the file still defines them: the next `sweep` runs them again).\n"
    "Exit codes: 0, 1 declined, or a removal failed (the path named; `rm` again finishes it), 2 invalid input, a\n"
    "refusal or a store that cannot be written, 3 an unreadable manifest."
)


def add_parser(sub: Any) -> None:
    """Register `rm` on the CLI's subparsers."""
    p = add_command(sub, "rm", cmd_rm, HELP, MORE)
    add_store_target(p, roots_too=False)
    p.add_argument("--run", action="append", required=True, metavar="ID", help=f"{RUN_HELP} (repeat for more runs)")
    p.add_argument("--yes", action="store_true", help="remove without asking (required without a terminal)")


def cmd_rm(args: argparse.Namespace, out: Console) -> int:
    """Remove the named runs of a sweep once confirmed, unless a stage of theirs is live or in flight."""
    listed = listed_target(args.target, args.root, sweeps_only=True)
    ((url, files),) = listed.sweeps.items()
    check_writable(url)
    runs = known_runs(url, files)
    chosen = list({r.run_id: r for r in (run_named(runs, given, url) for given in args.run)}.values())
    for run in chosen:
        why = run_removal.refusal(url, run.run_id, run_removal.stages_present(run.run_id, run.stages, files))
        if why is not None:
            raise UsageError(why)
    size = describe(out, url, chosen, files)
    if not args.yes and not confirmed(out, f"remove {len(chosen)} run(s), {size}"):
        out.print("nothing removed")
        return FAILED
    try:
        run_removal.remove_runs(url, chosen, files)
    except run_removal.Refused as e:
        raise UsageError(str(e)) from None
    except store.Unreadable as e:
        raise DamagedStore(f"{e} (the runs' files are removed; the manifest still lists them)") from None
    except (OSError, lease.LeaseLost) as e:
        why = contract.os_reason(e) if isinstance(e, OSError) and e.errno else str(e)
        out.print(Text(f"extrema-launch rm: not all removed: {why}", style="red"), soft_wrap=True)
        return FAILED
    out.print(f"removed {len(chosen)} run(s), {size}: {', '.join(r.run_id for r in chosen)}")
    return OK


def known_runs(url: str, files: Sequence[Found]) -> list[store.StoredRun]:
    """The runs the manifest lists, then run folders of the listing it does not (a removal cut short)."""
    try:
        manifest = store.read_manifest(url)
        listed = store.stored_runs_of(url, manifest) if manifest else []
    except store.Unreadable as e:
        raise DamagedStore(str(e)) from None
    ids = {r.run_id for r in listed}
    extra = sorted(d for d in disk_usage.run_dirs(files) if d not in ids and safe(d))
    return [*listed, *(store.StoredRun(d, ()) for d in extra)]


def safe(name: str) -> bool:
    """Whether a folder name can be a run id."""
    try:
        store.safe_name(name, "run id")
    except ValueError:
        return False
    return True


def describe(out: Console, url: str, runs: Sequence[store.StoredRun], files: Sequence[Found]) -> str:
    """Print each run with its stages, files and bytes; the bytes of them all."""
    usage = disk_usage.of_sweep(files)
    sizes = {r.run_id: disk_usage.summed(t for (run, _), t in usage.rows.items() if run == r.run_id) for r in runs}
    for r in runs:
        stages = ", ".join(run_removal.stages_present(r.run_id, r.stages, files)) or "no stage folders"
        line = f"{url}/{r.run_id} ({stages}): {sizes[r.run_id].files} files, {disk_view.human(sizes[r.run_id].total)}"
        out.print(Text(line), soft_wrap=True)
    return disk_view.human(sum(t.total for t in sizes.values()))


def confirmed(out: Console, what: str) -> bool:
    """Whether the person at the terminal typed `yes`; UsageError without a terminal (then --yes is required)."""
    if not sys.stdin.isatty():
        raise UsageError(f"{what}: no terminal to confirm on; give --yes to remove them (nothing removed)")
    return out.input(f"{what}? type yes to confirm: ").strip() == "yes"
