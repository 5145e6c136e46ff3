"""The sweep file's model: `SweepFile` (its `launcher`, its axes), a `Run` as expansion resolves it and the run ids
that name runs, and pydantic errors as Problems located at the field they name.

A sweep file has `name`, `base` (a full experiment), `sweep` (axes of dotted paths into `base`:
`launch.sweepfile.axes`), `launcher` (backend and resources, never part of a run's identity), `root` (the run store
URL) and `max_runs` (default 100,000: a sweep with more runs is refused, its size counted from the axes' lengths
before anything is expanded). Each experiment `launch.sweepfile.expand` resolves is validated on its own and named by
`run_id()`, a hash of its canonical JSON.
"""

from __future__ import annotations

import hashlib
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from extrema.spec import LOCATED, Experiment, LoggingSpec, RunSpec, StageName, identity, located
from launch.backends.local import LocalSettings
from launch.backends.ray.settings import RaySettings
from launch.backends.slurm.settings import SlurmSettings
from launch.inputs.errors import Loc, Problem
from launch.inputs.printable import clip, shown
from launch.runstore import store

MAX_RUNS = 100_000  # runs of one sweep unless its file says `max_runs:` (the launcher holds ~10 kB per run)
MAX_RUNS_CEILING = 1_000_000  # the most `max_runs` may say
STAGE_ORDER: tuple[str, ...] = typing.get_args(StageName)  # pretrain first, then the downstream stages


class LauncherSpec(SlurmSettings, RaySettings, LocalSettings):
    """A sweep file's `launcher`: the settings every backend reads (`LauncherSettings`: backend, resources, stages),
    each backend's own (declared by the backend: `max_parallel`, `ray_address`, `slurm_folder`; the bases' order
    is the fields' order), and whether jobs run a code snapshot. Never part of a run's identity."""

    snapshot: bool = Field(
        True, description="jobs run a snapshot of the code taken at submission (launch.runstore.snapshot)"
    )


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
    `launch.runstore.store.StoredRun` (`stored()`)."""

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


def run_id(experiment: Experiment, earlier: bool = False) -> str:
    """10 hex digits of the sha256 of the experiment's canonical JSON (sorted keys, no spaces; `spec.identity`);
    `earlier`: the id the rule before 2026-12 gave it (settings outside the identity included)."""
    return _digest(canonical_json(identity(experiment, earlier)))


class RunIds:
    """`run_id()` for many experiments of one sweep, fast: the canonical JSON is built section by section (the
    sorted top-level keys joined exactly as `json.dumps` joins them), and a section equal to the one seen before
    reuses that one's text. Sweeps change a few sections per run; the rest are the same from run to run."""

    def __init__(self, earlier: bool = False) -> None:
        self.earlier = earlier
        self._last: dict[str, tuple[Any, str]] = {}
        self._keys: dict[type[BaseModel], list[tuple[str, str]]] = {}

    def __call__(self, experiment: Experiment) -> str:
        """The run id of the experiment, equal to `run_id(experiment, self.earlier)`."""
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
                dumped = identity(value, self.earlier) if isinstance(value, BaseModel) else None
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
