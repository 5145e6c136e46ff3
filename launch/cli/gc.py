"""`extrema-launch gc`: remove the checkpoints of completed stages beyond their retention; a dry run unless --yes."""

from __future__ import annotations

import argparse
from typing import Any

from rich.console import Console
from rich.text import Text

from extrema.run import contract, lease
from launch.addressed import DAMAGED, FAILED, OK
from launch.cli.arguments import add_command
from launch.cli.listed import add_store_target, check_writable, listed_target
from launch.runstore import checkpoint_gc
from launch.views import disk_view

HELP = "remove checkpoints of completed stages beyond their retention (a dry run unless --yes)"
MORE = (
    "A completed stage keeps what its spec keeps (keep_last, keep_every); gc lists its older complete steps and\n"
    "steps that never got their .metadata, with --corrupt also the steps set aside in ckpt/corrupt/, and their\n"
    "bytes. The newest complete step (what downstream stages and `export` read) and export/ are never removed.\n"
    "A stage that is not completed, whose lease a live attempt holds, or whose spec names no retention is left\n"
    "as it is (listed with the reason). With --yes each stage's lease is taken (no waiting) while its folders\n"
    "are removed, so no attempt starts there meanwhile. A root removes from each of its sweeps.\n"
    "Exit codes: 0, 1 a folder could not be removed (named), 2 invalid input or a store that cannot be written,\n"
    "3 a folder could not be listed."
)


def add_parser(sub: Any) -> None:
    """Register `gc` on the CLI's subparsers."""
    p = add_command(sub, "gc", cmd_gc, HELP, MORE)
    add_store_target(p, roots_too=True)
    p.add_argument("--yes", action="store_true", help="remove them (without it: list what would be removed)")
    p.add_argument("--corrupt", action="store_true", help="also the steps set aside as corrupt (ckpt/corrupt/)")


def cmd_gc(args: argparse.Namespace, out: Console) -> int:
    """List (and with --yes remove) the checkpoint folders of completed stages beyond their retention."""
    listed = listed_target(args.target, args.root)
    if args.yes:
        check_writable(listed.url)
    plans = [checkpoint_gc.plan(url, files, args.corrupt) for url, files in listed.sweeps.items()]
    for plan in plans:
        disk_view.show_plan(out, plan, removing=args.yes)
    for p in listed.problems:
        out.print(Text(f"not listed: {p}", style="red"), soft_wrap=True, markup=False, highlight=False)
    folders = sum(len(r.folders) for p in plans for r in p.removals)
    size = disk_view.human(sum(p.size for p in plans))
    if not args.yes:
        out.print(f"dry run, nothing removed: --yes removes {folders} folder(s), {size}")
        return DAMAGED if listed.problems else OK
    freed, failed = 0, 0
    for plan in plans:
        for removal in plan.removals:
            try:
                checkpoint_gc.remove(plan.sweep, removal)
                freed += removal.size
            except checkpoint_gc.Held as e:
                out.print(Text(f"{removal.key}: left as it is: {e}", style="yellow"), soft_wrap=True)
            except (OSError, lease.LeaseLost) as e:
                failed += 1
                why = contract.os_reason(e) if isinstance(e, OSError) and e.errno else str(e)
                where = f"{plan.sweep}/{removal.key}"
                out.print(Text(f"{where}: not all removed: {why}", style="red"), soft_wrap=True)
    out.print(f"freed {disk_view.human(freed)}" + (f"; {failed} stage(s) not all removed" if failed else ""))
    return FAILED if failed else DAMAGED if listed.problems else OK
