"""`extrema-launch`: run sweeps of ExtreMA experiments and look after them.

    extrema-launch sweep   FILE [KEY=VALUE ...] [--backend local|slurm|ray] [--root URL] [--retry-failed]
                           [--dry-run [--show-scripts] [--json]] [--snapshot on|off] [--allow-code-change]
                           [--quiet | --json-events] [--progress-every S] [--check | --no-check]
    extrema-launch check   FILE [KEY=VALUE ...] [--utilization U] [--train-images N] [--json]   (will it fit?)
    extrema-launch status  FILE|URL [KEY=VALUE ...] [--json]     (a store root: its sweeps)
    extrema-launch status  FILE|URL --watch [--interval S]
    extrema-launch results FILE|URL [--format table|csv|parquet|json] [--out PATH]
    extrema-launch results FILE|URL --group-by [AXIS ...]             (mean, std, count over seeds)
    extrema-launch results FILE|URL --pivot ROWS COLUMNS --metric M [--stage S]
    extrema-launch plot    FILE|URL --out DIR [--axis AXIS]
    extrema-launch report  FILE|URL --out report.html
    extrema-launch viz attention FILE|URL --run ID [--images I ...] [--queries cls|P ...] [--out DIR]
    extrema-launch cancel  FILE|URL [--run ID]
    extrema-launch logs    FILE|URL --run ID --stage S [--follow]
    extrema-launch export  SOURCE [--run ID] [--branch ema|student] --format timm|official|safetensors --out PATH
    extrema-launch du      FILE|URL [--json]                          (bytes per run and stage; a root: per sweep)
    extrema-launch gc      FILE|URL [--yes] [--corrupt]               (checkpoints beyond retention; dry run)
    extrema-launch rm      FILE|URL --run ID [--run ID ...] [--yes]
    extrema-launch data shard SRC_URL DST_URL [--shard-size 1GB]
    extrema-launch schema  [--json]                                   (every field of a sweep file)

FILE|URL is a sweep YAML file or the `<root>/<sweep>` URL of a run store. Every job runs the code snapshot its
`sweep` took (`<root>/<sweep>/code/<id>/`), not whatever is installed when it starts (`--snapshot off`).

Backends: `local` runs the stages on this machine and shows progress until they end (Ctrl-C stops them,
resumably). `slurm` and `ray` return once the jobs are submitted. `ray` submits to launcher.ray_address, else
RAY_ADDRESS; with neither set it starts a private local Ray head for the sweep (its own ports, HOME and temp
dir), shows progress until the stages end like `local`, keeps each job's log in the stage's logs/, and stops it.

`status`, `cancel` and `logs` ask the backends (squeue/sacct, the Ray job API, the PID of a local sweep) and need
not run where the sweep was submitted; a stage whose job ended or vanished behind the run store's back is recorded
as failed or cancelled (a cancelled stage is resumed by the next `sweep`).

Exit codes: 0 success; 1 a job failed (sweep, status, logs --follow), a backend could not cancel, or `plot` found
nothing to plot; 2 invalid input or usage: nothing is submitted or written; 3 a record of the run store is
unreadable (each is listed with its path and reason; every readable row is shown, the damaged ones are held
back); 130 interrupted. `results` exits 0 once the table is out, failed stages included (see its state column).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata

from rich.console import Console
from rich.text import Text

from launch.addressed import DAMAGED, INTERRUPTED, USAGE
from launch.cli import cancel, check, du, export, gc, logs, plot, report, results, rm, schema, shard, status, sweep, viz
from launch.inputs.errors import DamagedStore, InvalidSweep, UsageError

DISTRIBUTION = "extrema-ssl"  # the name pip knows the project by (its import names: extrema, launch)
COMMANDS = (
    sweep,
    check,
    status,
    results,
    plot,
    viz,
    cancel,
    report,
    logs,
    export,
    du,
    gc,
    rm,
    shard,
    schema,
)  # in the order --help lists them


def version() -> str:
    """The installed distribution's version ("unknown" when it is not installed)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = argparse.ArgumentParser(
        prog="extrema-launch", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"extrema-launch {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 1 a job failed, 2 invalid input or usage, 130 interrupted)."""
    wide = None if sys.stdout.isatty() else 160  # pipes and logs get whole tables, not 80-column ones
    out, err = Console(width=wide), Console(stderr=True)
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # KEY=VALUE overrides may follow options (`sweep FILE --dry-run a.b=1`), where argparse leaves them over
        if extra and (not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra)):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if extra:
            args.overrides = [*args.overrides, *extra]
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else USAGE
    if getattr(args, "json_events", False) or getattr(args, "json", False):  # standard output carries JSON alone
        out = Console(stderr=True, width=wide)
    try:
        code: int = args.fn(args, out)
        return code
    except InvalidSweep as e:
        err.print(Text("invalid sweep (nothing submitted, nothing written):", style="bold red"))
        err.print(e.render(), markup=False, highlight=False, soft_wrap=True)
        return USAGE
    except UsageError as e:
        err.print(Text(f"extrema-launch: {e}", style="red"), soft_wrap=True)
        return USAGE
    except DamagedStore as e:
        err.print(Text(f"extrema-launch: unreadable run store record: {e}", style="red"), soft_wrap=True)
        return DAMAGED
    except KeyboardInterrupt:
        return INTERRUPTED
