"""The sweep file's fields for people and editors: every field path with its type, default and description, and a
JSON Schema of the file in which `base` is typed as the Experiment it becomes (so that editors can complete it)."""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from extrema.spec import Experiment
from launch.sweepfile.model import SweepFile


class SweepFileSchema(SweepFile):
    """A sweep file as editors should see it: `base` is an Experiment (stored raw, validated run by run)."""

    base: Experiment  # type: ignore[assignment]


@dataclass(frozen=True)
class FieldRow:
    """One field of a sweep file: its dotted path, type, default and description ("" when it has none)."""

    path: str
    type: str
    default: str
    description: str


def type_name(annotation: Any) -> str:
    """A short readable name of a field's type: `int`, `str | None`, `list[str]`, `Literal['a', 'b']`."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    text = repr(annotation).replace("typing.", "").replace("NoneType", "None")
    for module in (
        "extrema.spec.",
        "launch.backends.resources.",
        "launch.sweepfile.model.",
        "launch.backends.",
        "pathlib.",
    ):
        text = text.replace(module, "")
    return text


def _models(annotation: Any) -> Iterator[tuple[str, type[BaseModel]]]:
    """The sub-models a field holds: ("", model) directly or in a union, ("<key>", model) as a mapping's values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield "", annotation
        return
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            yield from _models(a)
    elif origin is dict and args:
        yield from ((f"<{name or 'key'}>", m) for name, m in _models(args[-1]))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "(required)" if field.default_factory is None else repr(field.default_factory())
    value = field.default
    return repr(value.model_dump(mode="json") if isinstance(value, BaseModel) else value)


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n", 1)[0]


def rows(model: type[BaseModel] = SweepFileSchema, prefix: str = "") -> list[FieldRow]:
    """Every field of `model` and of the models inside it, depth first, each with its dotted path."""
    out = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        subs = list(_models(field.annotation))
        default = "(section)" if subs else _default(field)
        about = field.description or (_first_line(subs[0][1].__doc__) if subs and not subs[0][0] else "")
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get("identity") == "never":
            about += " (not part of a run's identity)"
        out.append(FieldRow(path, type_name(field.annotation), default, about))
        for key, sub in subs:
            out += rows(sub, f"{path}.{key}." if key else f"{path}.")
    return out


def json_schema() -> dict[str, Any]:
    """The JSON Schema of a sweep file (`base` an Experiment), as pydantic writes it."""
    return SweepFileSchema.model_json_schema()
