"""Where an export's model settings come from: the spec of the run that wrote the checkpoint, else the file's own
description (our exports; an official checkpoint's `arch`), else the command's flags; in that order.

Flags given beside a spec or a description must agree with it: a contradiction is refused rather than guessed at.
When none of them names the architecture, `ModelSettingsError` says what to give. Torch-free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from extrema.run import contract, rundir
from extrema.spec import PRESETS, ModelSpec, RunSpec

# The ModelSpec fields a command line may give (flag --arch is field arch, --cls-token cls_token, ...).
FLAG_FIELDS = (
    "arch",
    "cls_token",
    "img_size",
    "patch_size",
    "in_chans",
    "class_attention_layers",
    "mlp_dim",
    "proj_dim",
)
RESOLVED = {"img_size": "resolved_img_size", "patch_size": "resolved_patch_size"}


class ModelSettingsError(ValueError):
    """No source of model settings says enough, or the flags contradict the one that does."""


@dataclass(frozen=True)
class Settings:
    """The model an export is built as, and which source said so."""

    model: ModelSpec
    origin: str


def flag_name(field: str) -> str:
    """The command-line flag of a ModelSpec field: cls_token -> --cls-token."""
    return "--" + field.replace("_", "-")


def stage_of(url: str) -> str | None:
    """The stage directory a checkpoint URL lies in (`<stage>/ckpt[/step-N]`, `<stage>/export/<file>`, `<stage>`),
    when it has a spec.json; else None."""
    parts = url.rstrip("/").rsplit("/", 3)
    candidates = [url.rstrip("/")]
    for depth in (1, 2):
        if len(parts) > depth:
            candidates.append("/".join(parts[:-depth]))
    for stage in candidates:
        if rundir.exists(contract.StageDir(stage).spec):
            return stage
    return None


def model_of_run(stage: str) -> dict[str, Any]:
    """The model settings in a stage's spec.json (as written, unset fields left out)."""
    raw = rundir.read_json(contract.StageDir(stage).spec)
    return RunSpec.model_validate(raw).experiment.model.model_dump(exclude_unset=True)


def model_of_file(description: Mapping[str, Any] | None, arch: Any = None) -> dict[str, Any] | None:
    """The model settings a file carries: our export's description, else an official checkpoint's `arch`."""
    if description is not None:
        return dict(description["model"])
    if isinstance(arch, str) and arch in PRESETS:
        return {"arch": arch, "cls_token": "cait"}  # the official release holds the cait design only
    return None


def choose(run: Mapping[str, Any] | None, file: Mapping[str, Any] | None, flags: Mapping[str, Any]) -> Settings:
    """The model settings from the first source that has them (run spec, file, flags); flags must agree with it."""
    given = {k: v for k, v in flags.items() if v is not None}
    unknown = sorted(set(given) - set(FLAG_FIELDS))
    if unknown:
        raise ModelSettingsError(f"not model settings: {', '.join(unknown)}")
    for origin, found in (("the run's spec", run), ("the file's description", file)):
        if found is None:
            continue
        model = validated(found, origin)
        clash = [
            f"{flag_name(k)} {v} (it says {value_of(model, k)})" for k, v in given.items() if value_of(model, k) != v
        ]
        if clash:
            raise ModelSettingsError(f"{origin} contradicts {'; '.join(clash)}: leave those flags out")
        return Settings(model, origin)
    if "arch" not in given:
        raise ModelSettingsError(
            "no model settings: the source is not in a run with a spec.json and the file describes none; give "
            "--arch (and --cls-token, --img-size, --patch-size, --class-attention-layers, --mlp-dim, --proj-dim "
            "where they differ from the defaults)"
        )
    return Settings(validated(given, "the flags"), "the flags")


def validated(fields: Mapping[str, Any], origin: str) -> ModelSpec:
    """A ModelSpec from settings, or ModelSettingsError naming the source and the first problem."""
    try:
        return ModelSpec.model_validate(dict(fields))
    except ValidationError as e:
        first = e.errors()[0]
        at = ".".join(str(p) for p in first["loc"])
        raise ModelSettingsError(f"model settings from {origin}: {at}: {first['msg']}") from None


def value_of(model: ModelSpec, field: str) -> Any:
    """A setting's effective value (a preset's image and patch size when unset)."""
    return getattr(model, RESOLVED.get(field, field))
