"""The sweep's axes: their dotted paths checked against the experiment, what is wrong with them, and their points.

Expansion is `runs x grid x zip`: every explicit run (or the base alone) is combined with every point of the grid (the
cartesian product, last axis fastest) and every position of the zip (lists advanced together). A point is the swept
values of one run, each with where in the file it came from.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

from launch.inputs.errors import Loc, Problem
from launch.sweepfile.model import MAX_RUNS, Axes, path_error

Point = tuple[dict[str, Any], dict[str, Loc]]  # (path -> value, path -> where in the file the value came from)


def _axis_paths(problems: list[Problem], loc: Loc, paths: list[str]) -> None:
    for p in paths:
        reason = path_error(p)
        if reason:
            problems.append(Problem("", (*loc, p), reason))


class PathIndex:
    """Dotted paths, asked in time linear in a path's depth whether they set the same value as another path."""

    def __init__(self, paths: Iterable[str]) -> None:
        self.paths = set(paths)
        self.inside = {".".join(p.split(".")[:i]): p for p in self.paths for i in range(1, p.count(".") + 1)}

    def clash(self, path: str) -> str | None:
        """A path equal to `path`, above it or inside it; None when there is none."""
        parts = path.split(".")
        above = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        return next((q for q in above if q in self.paths), None) or self.inside.get(path)


def _axes_problems(axes: Axes) -> list[Problem]:
    """What is wrong with the axes one by one: an empty axis or list of values, a bad path, zip lists of unequal
    lengths."""
    problems: list[Problem] = []
    for name, axis in (("grid", axes.grid), ("zip", axes.zip)):
        if axis is not None and not axis:
            problems.append(Problem("", ("sweep", name), f"{name} is empty: give at least one dotted path"))
        for path, values in (axis or {}).items():
            if not values:
                problems.append(Problem("", ("sweep", name, path), "no values: the sweep would have no runs"))
        _axis_paths(problems, ("sweep", name), list(axis or {}))
    if axes.runs is not None and not axes.runs:
        problems.append(Problem("", ("sweep", "runs"), "runs is empty: give at least one run or leave it out"))
    for i, run in enumerate(axes.runs or []):
        _axis_paths(problems, ("sweep", "runs", i), list(run))
    lengths = {path: len(v) for path, v in (axes.zip or {}).items()}
    if len(set(lengths.values())) > 1:
        sizes = ", ".join(f"{p} has {n}" for p, n in lengths.items())
        problems.append(Problem("", ("sweep", "zip"), f"zip lists must have equal lengths: {sizes}"))
    return problems


def _clash_problems(axes: Axes) -> list[Problem]:
    """Paths set by two axes: the zip may not share a path with the grid, nor a run with either (runs may share
    paths with each other)."""
    grid, zipped, runs = axes.grid or {}, axes.zip or {}, axes.runs or []
    in_grid = PathIndex(grid)
    in_fixed = PathIndex([*grid, *zipped])
    problems = []
    for label, paths, against in (
        ("zip", list(zipped), in_grid),
        *((f"runs[{i}]", list(r), in_fixed) for i, r in enumerate(runs)),
    ):
        for p in paths:
            clash = against.clash(p)
            if clash is not None:
                owner = "grid" if clash in grid else "zip"
                problems.append(Problem("", ("sweep",), f"{p} is set by both sweep.{owner} and sweep.{label}"))
    return problems


def _size_problem(axes: Axes, max_runs: int) -> Problem | None:
    """A sweep of more than `max_runs` runs, counted from the axes' lengths (nothing expanded); None when smaller."""
    grid, zipped, runs = axes.grid or {}, axes.zip or {}, axes.runs
    n_zip = len(next(iter(zipped.values()), [None]))
    n_runs = (1 if runs is None else len(runs)) * math.prod(len(v) for v in grid.values()) * n_zip
    if n_runs <= max_runs:
        return None
    factors = [
        *([f"{len(runs)} runs"] if runs else []),
        *(f"{len(v)} {p}" for p, v in grid.items()),
        *([f"{n_zip} zipped"] if zipped else []),
    ]
    count = f"{n_runs:,}" if n_runs < 10**15 else f"about 10^{len(str(n_runs)) - 1}"
    return Problem(
        "", ("sweep",), f"{count} runs ({' x '.join(factors)}): more than max_runs ({max_runs:,}); nothing was expanded"
    )


def _product(axes: Axes) -> list[Point]:
    """Every point of `runs x grid x zip` (the last grid axis fastest), each value with where it came from."""
    grid, zipped, runs = axes.grid or {}, axes.zip or {}, axes.runs
    grid_points: list[Point] = [
        ({p: v for p, (_, v) in zip(grid, combo)}, {p: ("sweep", "grid", p, j) for p, (j, v) in zip(grid, combo)})
        for combo in itertools.product(*(list(enumerate(vs)) for vs in grid.values()))
    ]
    n_zip = len(next(iter(zipped.values()), [None]))
    zip_points: list[Point] = [
        ({p: vs[j] for p, vs in zipped.items()}, {p: ("sweep", "zip", p, j) for p in zipped}) for j in range(n_zip)
    ]
    run_points: list[Point] = (
        [({}, {})] if runs is None else [(r, {p: ("sweep", "runs", i, p) for p in r}) for i, r in enumerate(runs)]
    )
    return [
        ({**r[0], **g[0], **z[0]}, {**r[1], **g[1], **z[1]})
        for r, g, z in itertools.product(run_points, grid_points, zip_points)
    ]


def sweep_points(axes: Axes | None, problems: list[Problem], max_runs: int = MAX_RUNS) -> list[Point]:
    """The sweep's points, or [] with `problems` extended by what is wrong with its axes."""
    if axes is None:
        return [({}, {})]
    if axes.grid is None and axes.zip is None and axes.runs is None:
        problems.append(
            Problem("", ("sweep",), "no axes: give grid, zip or runs, or leave `sweep` out to run base once")
        )
        return []
    problems += [*_axes_problems(axes), *_clash_problems(axes)]
    too_many = _size_problem(axes, max_runs)
    if too_many is not None:
        problems.append(too_many)
    return [] if problems else _product(axes)
