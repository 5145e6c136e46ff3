"""Sweep files: the `SweepFile` model, loading YAML with `include:`, and the pure `expand()` into runs.

A sweep file has `name`, `base` (a full experiment), `sweep` (axes of dotted paths into `base`), `launcher` (backend
and resources, never part of a run's identity), `root` (the run store URL) and `max_runs` (default 100,000: a sweep
with more runs is refused, its size counted from the axes' lengths before anything is expanded). Expansion is
`runs x grid x zip`: every explicit run (or the base alone) is combined with every point of the grid (the
cartesian product, last axis fastest) and every position of the zip (lists advanced together). Each resolved
experiment is validated on its own and named by `run_id()`, a hash of its canonical JSON.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from extrema.spec import (
    LOCATED,
    SINGLE_PROCESS_STAGES,
    Experiment,
    LoggingSpec,
    RunSpec,
    StageName,
    identity,
    located,
)
from launch import store
from launch.backends.local import LocalSettings
from launch.backends.ray.settings import RaySettings
from launch.backends.slurm.settings import SlurmSettings
from launch.errors import InvalidSweep, Loc, Problem
from launch.overrides import Override, attribute, axis_paths
from launch.overrides import apply as apply_overrides
from launch.overrides import parse as parse_overrides
from launch.printable import clip, shown
from launch.yamlfile import Source, deep_merge, load_with_includes, locate

MAX_RUNS = 100_000  # runs of one sweep unless its file says `max_runs:` (the launcher holds ~10 kB per run)
MAX_RUNS_CEILING = 1_000_000  # the most `max_runs` may say
STAGE_ORDER: tuple[str, ...] = typing.get_args(StageName)  # pretrain first, then the downstream stages


class LauncherSpec(SlurmSettings, RaySettings, LocalSettings):
    """A sweep file's `launcher`: the settings every backend reads (`LauncherSettings`: backend, resources, stages),
    each backend's own (declared by the backend: `max_parallel`, `ray_address`, `slurm_folder`; the bases' order
    is the fields' order), and whether jobs run a code snapshot. Never part of a run's identity."""

    snapshot: bool = Field(True, description="jobs run a snapshot of the code taken at submission (launch.snapshot)")


class Axes(BaseModel):
    """The swept dotted paths: `grid` (cartesian), `zip` (advanced together) and explicit `runs`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: dict[str, list[Any]] | None = Field(
        None, description="dotted path -> values: every combination is a run (the last path varies fastest)"
    )
    zip: dict[str, list[Any]] | None = Field(
        None, description="dotted path -> values, lists of one length advanced together: position i is one point"
    )
    runs: list[dict[str, Any]] | None = Field(
        None, description="explicit runs, each a mapping of dotted path -> value, combined with the grid and zip"
    )


class SweepFile(BaseModel):
    """A validated sweep file. `base` stays raw: each run is validated after its overrides are applied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="the sweep's name: its directory under root (letters, digits, _ . -)")
    base: dict[str, Any] = Field(description="the experiment every run starts from (an Experiment; see base.*)")
    sweep: Axes | None = Field(None, description="the axes: dotted paths into base and their values (none: base once)")
    launcher: LauncherSpec = Field(
        LauncherSpec(), description="where and how the stages run; never part of a run's identity"
    )
    logging: LoggingSpec = Field(LoggingSpec(), description="where each stage's metrics go besides metrics.jsonl")
    root: str = Field("./runs", description="the run store: a local path or any fsspec URL every node can reach")
    max_runs: int = Field(
        MAX_RUNS, ge=1, le=MAX_RUNS_CEILING, description="a sweep of more runs is refused before it is expanded"
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return store.safe_name(v, "name")

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        store.normalize_root(v)  # ValueError naming the root and why it cannot be a run store
        return v

    @model_validator(mode="after")
    def _launcher_fits_root(self) -> SweepFile:
        problem = self.launcher.root_problem(self.root)
        if problem is not None:
            raise located(f"launcher.{problem[0]}", problem[1])
        return self


@dataclass(frozen=True)
class Run:
    """One run of a sweep as `expand()` resolves it from the file: its id, the swept values that made it, the
    validated experiment and its stages. Each stage becomes an `extrema.spec.RunSpec` (`spec()`, written as the
    stage's spec.json) and a `launch.backends.base.Job` (`launch.pipeline.plan`); the manifest keeps it as a
    `launch.store.StoredRun` (`stored()`)."""

    run_id: str
    overrides: dict[str, Any]
    experiment: Experiment
    stages: tuple[str, ...]

    def spec(self, sweep: str, stage: str) -> RunSpec:
        """The RunSpec one stage job executes."""
        return RunSpec(
            sweep=sweep, run_id=self.run_id, stage=stage, experiment=self.experiment, overrides=self.overrides
        )  # type: ignore[arg-type]

    def stored(self) -> store.StoredRun:
        """The run as the run store's manifest lists it."""
        return store.StoredRun(self.run_id, self.stages, self.overrides)


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: equal values, equal text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def run_id(experiment: Experiment) -> str:
    """10 hex digits of the sha256 of the experiment's canonical JSON (sorted keys, no spaces; `spec.identity`)."""
    return _digest(canonical_json(identity(experiment)))


class RunIds:
    """`run_id()` for many experiments of one sweep, fast: the canonical JSON is built section by section (the
    sorted top-level keys joined exactly as `json.dumps` joins them), and a section equal to the one seen before
    reuses that one's text. Sweeps change a few sections per run; the rest are the same from run to run."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[Any, str]] = {}
        self._keys: dict[type[BaseModel], list[tuple[str, str]]] = {}

    def __call__(self, experiment: Experiment) -> str:
        """The run id of the experiment, equal to `run_id(experiment)`."""
        model = type(experiment)
        if model not in self._keys:
            names = sorted({*model.model_fields, *model.model_computed_fields})
            self._keys[model] = [(name, json.dumps(name) + ":") for name in names]
        parts = []
        for name, key in self._keys[model]:
            value = getattr(experiment, name)
            seen = self._last.get(name)
            if seen is not None and (seen[0] is value or (type(seen[0]) is type(value) and seen[0] == value)):
                text = seen[1]
            else:
                dumped = identity(value) if isinstance(value, BaseModel) else None
                text = canonical_json(
                    dumped if dumped is not None else experiment.model_dump(mode="json", include={name})[name]
                )
                self._last[name] = (value, text)
            parts.append(key + text)
        return _digest("{" + ",".join(parts) + "}")


def ordered_stages(experiment: Experiment) -> tuple[str, ...]:
    """The experiment's stages with pretrain first, then the rest in pipeline order."""
    return tuple(s for s in STAGE_ORDER if s in experiment.stages)


def needs_pretrain(experiment: Experiment, stage: str) -> bool:
    """Whether a downstream stage starts from its run's pretrain checkpoint (no checkpoint URL, not random init)."""
    settings = experiment.__dict__.get(stage)  # a model's field values; plain lookups, fast for big sweeps
    values = settings.__dict__ if isinstance(settings, BaseModel) else {}
    return values.get("init", "pretrained") == "pretrained" and not values.get("checkpoint")


def _field_type(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].annotation


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next((m for m in map(_model_of, typing.get_args(annotation)) if m), None)
    return None


def model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The pydantic model found at `loc` inside `root` (through sub-models, dict values and list items)."""
    annotation: Any = root
    for part in loc:
        model = _model_of(annotation)
        if model is not None and isinstance(part, str) and part in model.model_fields:
            annotation = _field_type(model, part)
            continue
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) in (dict, list, tuple) and args:
            annotation = args[-1]
            continue
        return None
    return _model_of(annotation)


def path_error(path: str) -> str | None:
    """Why a dotted path does not name a field of an experiment, or None when it does."""
    model: type[BaseModel] | None = Experiment
    parts = path.split(".")
    for i, part in enumerate(parts):
        where = ".".join(parts[:i]) or "the experiment"
        if model is None:
            return f"{where} is a value, not a section: it has no field {shown(part)}"
        if part not in model.model_fields:
            return f"unknown field {shown(part)} in {clip(where)} (known: {', '.join(model.model_fields)})"
        model = _model_of(_field_type(model, part))
    return None


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


Point = tuple[dict[str, Any], dict[str, Loc]]  # (path -> value, path -> where in the file the value came from)


def _axis_paths(problems: list[Problem], loc: Loc, paths: list[str]) -> None:
    for p in paths:
        reason = path_error(p)
        if reason:
            problems.append(Problem("", (*loc, p), reason))


class _PathIndex:
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
    in_grid = _PathIndex(grid)
    in_fixed = _PathIndex([*grid, *zipped])
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


def _points(axes: Axes | None, problems: list[Problem], max_runs: int = MAX_RUNS) -> list[Point]:
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


def _reason(err: Any, root: type[BaseModel], loc: Loc) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        model = model_at(root, loc[:-1])
        known = f" (known: {', '.join(model.model_fields)})" if model else ""
        return f"unknown key {shown(loc[-1])}{known}"
    if kind == "missing":
        return "required key is missing"
    if kind in ("value_error", "assertion_error"):
        return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    return f"{msg} (got {shown(err.get('input'), 60)})"


def validation_problems(error: ValidationError, root: type[BaseModel], prefix: Loc = ()) -> list[Problem]:
    """One Problem per pydantic error, located by its dotted path under `prefix` (a `located` error: at the field
    it names below that path)."""
    out = []
    for err in error.errors(include_url=False):
        loc: Loc = tuple(err["loc"])
        if err["type"] == LOCATED:
            ctx = err.get("ctx") or {}
            loc, reason = (*loc, *str(ctx["at"]).split(".")), str(ctx["reason"])
        else:
            reason = _reason(err, root, loc)
        out.append(Problem("", (*prefix, *loc), reason))
    return out


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
    points = _points(sweep.sweep, problems, sweep.max_runs)
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
                Problem("", where, f"runs {seen[rid] + 1} and {i + 1} are the same experiment ({_describe(overrides)})")
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
    index = _PathIndex(p for p in swept if p)
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


def load_sweep(
    path: str | Path, backend: str | None = None, root: str | None = None, overrides: Sequence[str] = ()
) -> tuple[SweepFile, list[Source]]:
    """Read and validate a sweep file (includes merged underneath); command-line settings and `key=value`
    overrides (launch.overrides) win over the file."""
    raw, sources, given, problems = _raw_sweep(path, backend, root, overrides)
    try:
        sweep = SweepFile.model_validate(raw)
    except ValidationError as e:
        found = validation_problems(e, SweepFile)
        raise _invalid(problems + found + _also_expand(raw, found), sources, given) from None
    if problems:
        raise _invalid(problems, sources, given)
    return sweep, sources


def load_runs(
    path: str | Path, backend: str | None = None, root: str | None = None, overrides: Sequence[str] = ()
) -> tuple[SweepFile, list[Run]]:
    """Load a sweep file and expand it; every problem (the file's, the axes', every run's and the overrides') in one
    InvalidSweep, each naming the file or argument, the dotted path and the reason."""
    raw, sources, given, problems = _raw_sweep(path, backend, root, overrides)
    try:
        sweep = SweepFile.model_validate(raw)
    except ValidationError as e:
        found = validation_problems(e, SweepFile)
        raise _invalid(problems + found + _also_expand(raw, found), sources, given) from None
    try:
        runs = expand(sweep)
    except InvalidSweep as e:
        problems += e.problems
    if problems:
        raise _invalid(problems, sources, given)
    return sweep, runs
