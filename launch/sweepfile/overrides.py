"""Command-line overrides of a sweep file: `key=value` arguments set into the file's mapping before it is validated.

A key is a dotted path into `base` (`pretrain.base_lr`, or `base.pretrain.base_lr`), `launcher` (`launcher.x.y`) or
`logging` (`logging.x`); a value is a YAML scalar or flow collection read as the sweep file is
(`launch.inputs.yamlfile`: the same loader and size bounds; `1e-4` is a number, `[a, b]` a list, `{nodes: 2}` a
mapping). An override of a path the sweep's axes set is refused: the axis would replace it in every run. Problems
name the argument as given and the dotted field path, so they render as one line each:
`argument pretrain.base_lr=abc: base.pretrain.base_lr: Input should be a valid number`.
"""

from __future__ import annotations

import copy
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from launch.inputs.errors import InvalidSweep, Problem
from launch.inputs.printable import clip, printable
from launch.inputs.yamlfile import MAX_YAML_BYTES, deep_merge, parse_yaml

SECTIONS = ("base", "launcher", "logging")  # top-level keys an override may name; anything else goes into base


@dataclass(frozen=True)
class Override:
    """One `key=value` argument: as given, where it lands in the sweep file's mapping, and its value."""

    arg: str
    loc: tuple[str, ...]
    value: Any

    @property
    def where(self) -> str:
        """How a problem names the argument: `argument <key=value>`, printable and clipped."""
        return f"argument {clip(printable(self.arg), 120)}"


def parse(args: Sequence[str]) -> tuple[list[Override], list[Problem]]:
    """The overrides of `key=value` arguments, and one Problem per argument that is not one."""
    out: list[Override] = []
    problems: list[Problem] = []
    budget = MAX_YAML_BYTES
    for arg in args:
        where = f"argument {clip(printable(arg), 120)}"
        key, eq, text = arg.partition("=")
        parts = tuple(key.strip().split("."))
        if not eq or not key.strip() or any(not p for p in parts):
            reason = "not an override: give KEY=VALUE with KEY a dotted path (a.b.c)"
            problems.append(Problem(where, (clip(arg.strip() or "''", 60),), reason))
            continue
        loc = parts if parts[0] in SECTIONS and len(parts) > 1 else ("base", *parts)
        budget -= len(arg.encode())
        if budget < 0:
            problems.append(Problem(where, loc, f"overrides may have {MAX_YAML_BYTES:,} bytes in all"))
            continue
        try:
            value, _ = parse_yaml(text, where)
        except InvalidSweep as e:
            problems += [Problem(where, loc, p.reason) for p in e.problems]
            continue
        out.append(Override(arg, loc, value))
    return out, problems


def axis_paths(raw: dict[str, Any]) -> list[str]:
    """The dotted paths a raw sweep file's axes set (read defensively: the axes may be malformed)."""
    axes = raw.get("sweep")
    if not isinstance(axes, dict):
        return []
    paths: list[str] = []
    for name in ("grid", "zip"):
        axis = axes.get(name)
        paths += [str(p) for p in axis] if isinstance(axis, dict) else []
    runs = axes.get("runs")
    for run in runs if isinstance(runs, list) else []:
        paths += [str(p) for p in run] if isinstance(run, dict) else []
    return list(dict.fromkeys(paths))


def _clash(path: str, paths: Sequence[str]) -> str | None:
    return next((p for p in paths if p == path or p.startswith(path + ".") or path.startswith(p + ".")), None)


def apply(raw: dict[str, Any], overrides: Sequence[Override]) -> list[Problem]:
    """Set every override into `raw` (copying what it changes), in order; a Problem for each that cannot be set."""
    problems = []
    swept = axis_paths(raw)
    for o in overrides:
        if o.loc[0] == "base":
            clash = _clash(".".join(o.loc[1:]), swept)
            if clash is not None:
                reason = f"{clash} is swept by the file's sweep axes: the axis would replace this value in every run"
                problems.append(Problem(o.where, o.loc, reason))
                continue
        node = raw
        for i, part in enumerate(o.loc[:-1]):
            nxt = node.get(part)
            if nxt is not None and not isinstance(nxt, dict):
                where = ".".join(o.loc[: i + 1])
                problems.append(Problem(o.where, o.loc, f"{where} is a value, not a section: it has no field {part}"))
                break
            node[part] = dict(nxt or {})
            node = node[part]
        else:
            old = node.get(o.loc[-1])
            both = isinstance(old, dict) and isinstance(o.value, dict)
            node[o.loc[-1]] = deep_merge(old, o.value) if both else copy.deepcopy(o.value)
    return problems


def attribute(problems: Sequence[Problem], overrides: Sequence[Override]) -> list[Problem]:
    """Problems at (or above, or inside) an override's path named after that argument, the first that fits."""
    out = []
    for p in problems:
        loc = tuple(str(x) for x in p.loc)
        owner = next(
            (o for o in overrides if len(loc) >= 2 and (loc[: len(o.loc)] == o.loc or o.loc[: len(loc)] == loc)),
            None,
        )
        out.append(p if owner is None else replace(p, file=owner.where, line=None))
    return out


def source(file: str, args: Sequence[str]) -> str:
    """The manifest's `source` of a submission: the file's path, followed by its overrides as a shell would quote
    them (the path alone without overrides)."""
    return shlex.join([file, *args]) if args else file


def recorded(manifest_source: Any, file: str) -> list[str] | None:
    """The overrides a manifest's `source` records for `file`; None when the source names another file."""
    if not isinstance(manifest_source, str):
        return None
    if manifest_source == file:
        return []
    try:
        words = shlex.split(manifest_source)
    except ValueError:
        return None
    return words[1:] if words and words[0] == file else None
