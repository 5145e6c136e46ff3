"""Loading a sweep file (`load_sweep`, `load_runs`: includes, command-line settings and overrides) and the pure
`expand()` of a `SweepFile` into runs, every problem of the file, its axes and its runs in one InvalidSweep."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from extrema.spec import SINGLE_PROCESS_STAGES, Experiment
from launch.inputs.errors import InvalidSweep, Loc, Problem
from launch.inputs.printable import clip
from launch.inputs.yamlfile import Source, deep_merge, load_with_includes, locate
from launch.sweepfile.axes import PathIndex, sweep_points
from launch.sweepfile.model import (
    LauncherSpec,
    Run,
    RunIds,
    SweepFile,
    needs_pretrain,
    ordered_stages,
    validation_problems,
)
from launch.sweepfile.overrides import Override, attribute, axis_paths
from launch.sweepfile.overrides import apply as apply_overrides
from launch.sweepfile.overrides import parse as parse_overrides


def _set(raw: dict[str, Any], path: str, value: Any) -> None:
    """Set a dotted path in `raw`, copying the mappings along the path (copy on write: the rest stays shared)."""
    parts = path.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is not None and not isinstance(nxt, dict):
            raise ValueError(f"base.{'.'.join(parts[: i + 1])} is not a mapping, cannot set {path}")
        nxt = node[part] = dict(nxt or {})
        node = nxt
    last = parts[-1]
    old = node.get(last)
    node[last] = deep_merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else copy.deepcopy(value)


def _describe(overrides: dict[str, Any]) -> str:
    return clip(", ".join(f"{p}={clip(json.dumps(v, default=str))}" for p, v in overrides.items()) or "base", 200)


def _run_problems(error: ValidationError, overrides: dict[str, Any], origin: dict[str, Loc]) -> list[Problem]:
    out = []
    for problem in validation_problems(error, Experiment):
        path = ".".join(str(p) for p in problem.loc)
        owner = next(
            (p for p in origin if path and (path == p or path.startswith(p + ".") or p.startswith(path + "."))), None
        )
        if owner is not None:
            exact = bool(problem.loc) and path == owner
            out.append(
                Problem(
                    "", origin[owner], problem.reason if exact else f"{problem.reason} (run {_describe(overrides)})"
                )
            )
        elif overrides and not problem.loc:
            out.append(Problem("", ("base",), f"{problem.reason} (run {_describe(overrides)})"))
        else:
            out.append(Problem("", ("base", *problem.loc), problem.reason))
    return out


def _validated_sections(base: dict[str, Any]) -> dict[str, BaseModel]:
    """The sections of `base` that are valid on their own, as model instances (the others stay raw)."""
    out = {}
    for name, value in base.items():
        field = Experiment.model_fields.get(name)
        model = field.annotation if field is not None else None
        if isinstance(value, dict) and isinstance(model, type) and issubclass(model, BaseModel):
            try:
                out[name] = model.model_validate(value)
            except ValidationError:
                continue
    return out


def one_process_problems(launcher: LauncherSpec, stages: tuple[str, ...], reported: set[str]) -> list[Problem]:
    """A stage that runs in one process only (SINGLE_PROCESS_STAGES) given several by the launcher: refused before
    submission, once per stage (`reported` collects the stages already named)."""
    problems = []
    for stage in stages:
        r = launcher.resources_for(stage)
        if stage in SINGLE_PROCESS_STAGES and r.nodes * r.processes_per_node > 1 and stage not in reported:
            reported.add(stage)
            problems.append(
                Problem(
                    "",
                    ("launcher", "stages", stage) if stage in launcher.stages else ("launcher", "resources"),
                    f"{stage} runs in one process, not {r.nodes} x {r.processes_per_node}: give it its own resources, "
                    f"launcher.stages.{stage}: {{nodes: 1, processes_per_node: 1"
                    + (", gpus_per_node: 1}" if r.gpus_per_node > 1 else "}"),
                )
            )
    return problems


def _base_problems(sweep: SweepFile) -> list[Problem]:
    """What is wrong with the base experiment alone, leaving out what the axes set in every run."""
    try:
        Experiment.model_validate(sweep.base)
    except ValidationError as e:
        return _unswept(validation_problems(e, Experiment, ("base",)), axis_paths(sweep.model_dump()))
    return []


def idle_gpu_problems(launcher: LauncherSpec, stages: tuple[str, ...], reported: set[str]) -> list[Problem]:
    """A stage whose resources ask for more GPUs per node than they run ranks per node (ResourcesSpec.allow_idle_gpus
    unset): refused before submission, once per stage (`reported` collects the stages already named)."""
    problems = []
    for stage in stages:
        r = launcher.resources_for(stage)
        reason = r.idle_gpus_problem()
        if (
            reason
            and stage not in reported
            and (r.nodes * r.processes_per_node == 1 or stage not in SINGLE_PROCESS_STAGES)
        ):
            reported.add(stage)
            own = stage in launcher.stages
            loc: Loc = ("launcher", "stages", stage) if own else ("launcher", "resources")
            problems.append(Problem("", loc, f"{stage}: {reason}" if own else reason))
    return problems


def expand(sweep: SweepFile) -> list[Run]:
    """Every run of a sweep, in a stable order; InvalidSweep listing every problem found."""
    problems: list[Problem] = []
    points = sweep_points(sweep.sweep, problems, sweep.max_runs)
    runs: list[Run] = []
    seen: dict[str, int] = {}
    ids = RunIds()
    seen_stages: set[str] = set()
    idle_stages: set[str] = set()
    if problems:  # the axes are wrong: the base alone is validated too, so that one pass shows every problem
        raise InvalidSweep(problems + _base_problems(sweep))
    fixed = _validated_sections(sweep.base)
    for i, (overrides, origin) in enumerate(points):
        touched = {p.split(".", 1)[0] for p in overrides}
        # Sections no override touches go in validated once (pydantic takes model instances as they are); the
        # rest are validated per run. _set copies what it changes; validation never mutates its input.
        raw = {**sweep.base, **{k: v for k, v in fixed.items() if k not in touched}}
        try:
            for path, value in overrides.items():
                _set(raw, path, value)
            experiment = Experiment.model_validate(raw)
        except ValueError as e:  # pydantic's ValidationError is a ValueError
            if isinstance(e, ValidationError):
                problems.extend(_run_problems(e, overrides, origin))
            else:
                problems.append(Problem("", ("base",), str(e)))
            continue
        rid = ids(experiment)
        if rid in seen:
            where = next(iter(origin.values()), ("sweep",))
            problems.append(
                Problem(
                    "",
                    where,
                    f"runs {seen[rid] + 1} and {i + 1} are the same experiment ({_describe(overrides)}); settings "
                    "outside a run's identity (loader workers, cadences, retention, store access) tell no runs apart",
                )
            )
            continue
        seen[rid] = i
        orphans = [s for s in experiment.stages if s != "pretrain" and needs_pretrain(experiment, s)]
        if orphans and "pretrain" not in experiment.stages:
            for s in orphans:
                problems.append(
                    Problem("", ("base", "stages"), f"{s} needs pretrain in stages or a {s}.checkpoint URL")
                )
            continue
        problems.extend(one_process_problems(sweep.launcher, experiment.stages, seen_stages))
        problems.extend(idle_gpu_problems(sweep.launcher, experiment.stages, idle_stages))
        runs.append(Run(rid, overrides, experiment, ordered_stages(experiment)))
    if problems:
        raise InvalidSweep(problems)
    return runs


def _also_expand(raw: dict[str, Any], found: list[Problem]) -> list[Problem]:
    """When the sweep file's top-level keys other than `base` are wrong, the runs' own problems too (the base alone
    where the axes are wrong), so that one pass shows them all."""
    bad = {p.loc[0] for p in found if p.loc}
    if not bad or "base" in bad or not isinstance(raw.get("base"), dict):
        return []
    kept = {k: v for k, v in raw.items() if k not in bad}
    if "name" in bad:
        kept["name"] = "sweep"
    try:
        expand(SweepFile.model_validate(kept))
    except InvalidSweep as e:
        return _unswept(e.problems, axis_paths(raw)) if "sweep" in bad else e.problems
    except ValidationError:
        return []
    return []


def _unswept(problems: list[Problem], swept: list[str]) -> list[Problem]:
    """The problems of the base alone that no axis path decides (an axis sets a value there in every run)."""
    index = PathIndex(p for p in swept if p)
    out = []
    for p in problems:
        path = ".".join(str(x) for x in p.loc[1:]) if p.loc[:1] == ("base",) else ""
        if not (path and index.clash(path)):
            out.append(p)
    return out


def _raw_sweep(
    path: str | Path, backend: str | None, root: str | None, overrides: Sequence[str]
) -> tuple[dict[str, Any], list[Source], list[Override], list[Problem]]:
    """The file's mapping (includes merged underneath) with the command line's settings and overrides set into it,
    the overrides and what is wrong with them."""
    raw, sources = load_with_includes(Path(path))
    if backend is not None:
        launcher = raw.get("launcher")
        raw["launcher"] = {**(launcher if isinstance(launcher, dict) else {}), "backend": backend}
    if root is not None:
        raw["root"] = root
    given, problems = parse_overrides(overrides)
    problems += apply_overrides(raw, given)
    return raw, sources, given, problems


def _invalid(problems: list[Problem], sources: list[Source], given: list[Override]) -> InvalidSweep:
    located_ = [p if p.file else locate([p], sources)[0] for p in problems]  # an argument's problems name it already
    return InvalidSweep(attribute(located_, given))


def _validated(
    path: str | Path, backend: str | None, root: str | None, overrides: Sequence[str]
) -> tuple[SweepFile, list[Source], list[Override], list[Problem]]:
    """The sweep file validated with the command line's settings and overrides set into it, its sources, the
    overrides and what is wrong with them; InvalidSweep (the runs' problems too, where they can be found) when the
    file itself is invalid."""
    raw, sources, given, problems = _raw_sweep(path, backend, root, overrides)
    try:
        sweep = SweepFile.model_validate(raw)
    except ValidationError as e:
        found = validation_problems(e, SweepFile)
        raise _invalid(problems + found + _also_expand(raw, found), sources, given) from None
    return sweep, sources, given, problems


def load_sweep(
    path: str | Path, backend: str | None = None, root: str | None = None, overrides: Sequence[str] = ()
) -> tuple[SweepFile, list[Source]]:
    """Read and validate a sweep file (includes merged underneath); command-line settings and `key=value`
    overrides (launch.sweepfile.overrides) win over the file."""
    sweep, sources, given, problems = _validated(path, backend, root, overrides)
    if problems:
        raise _invalid(problems, sources, given)
    return sweep, sources


def load_runs(
    path: str | Path, backend: str | None = None, root: str | None = None, overrides: Sequence[str] = ()
) -> tuple[SweepFile, list[Run]]:
    """Load a sweep file and expand it; every problem (the file's, the axes', every run's and the overrides') in one
    InvalidSweep, each naming the file or argument, the dotted path and the reason."""
    sweep, sources, given, problems = _validated(path, backend, root, overrides)
    try:
        runs = expand(sweep)
    except InvalidSweep as e:
        problems += e.problems
    if problems:
        raise _invalid(problems, sources, given)
    return sweep, runs
