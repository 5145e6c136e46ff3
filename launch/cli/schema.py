"""`extrema-launch schema`: every field of a sweep file with its type, default and description (--json: the file's
JSON Schema, `base` typed as the Experiment, for editors)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

from launch.addressed import OK
from launch.cli.arguments import add_command
from launch.sweepfile import schema
from launch.views import tables

HELP = "every field of a sweep file: dotted path, type, default and description"
MORE = (
    "The fields of base are an experiment's (extrema.spec.Experiment): the paths sweep axes and KEY=VALUE\n"
    "overrides name, without the `base.` in front. launcher.stages.<stage> takes the fields of launcher.resources.\n"
    "--json prints a JSON Schema of the sweep file (base typed as the Experiment), for editors that complete YAML.\n"
    "Exit codes: 0."
)


def add_parser(sub: Any) -> None:
    """Register `schema` on the CLI's subparsers."""
    p = add_command(sub, "schema", cmd_schema, HELP, MORE)
    p.add_argument("--json", action="store_true", help="a JSON Schema of the sweep file on standard output")


def cmd_schema(args: argparse.Namespace, out: Console) -> int:
    """Print every field of a sweep file (or its JSON Schema)."""
    if args.json:
        sys.stdout.write(json.dumps(schema.json_schema(), indent=1) + "\n")
        return OK
    fields = schema.rows()
    cells = [(f.path, f.type, f.default, f.description or "-") for f in fields]
    tables.show(out, f"sweep file: {len(fields)} fields", ("field", "type", "default", "description"), cells)
    return OK
