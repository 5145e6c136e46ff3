"""What specs are built from: the base class, errors located at a field, the run-identity marker, and the field groups
(mixins) that several stage specs share. Torch-free; `extrema.spec` builds the experiment from these.

A group whose defaults differ by stage declares its fields through the typed aliases below (type, bounds and
description in one place); each stage then states only its default, e.g. `base_lr: BaseLr = 0.1`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

LOCATED = "located"  # the pydantic error type of `located` errors; their context holds `at` and `reason`


def located(at: str, reason: str) -> PydanticCustomError:
    """The error a model validator raises about a field below it (`at`: its dotted path from the model): reported
    at that field, with the reason alone."""
    return PydanticCustomError(LOCATED, "{at}: {reason}", {"at": at, "reason": reason})


# A field marked WHEN_SET is part of a run's identity only when it differs from its default: fields added after runs
# exist keep every earlier run's id (`extrema.spec.identity`).
WHEN_SET: dict[str, Any] = {"identity": "when_set"}
# A field marked NOT_IDENTITY is never part of a run's identity: it changes how a stage runs (loader processes, log,
# evaluation and checkpoint cadences, retention, how an object store is reached), never what the stage computes, so
# changing it reuses the run, its checkpoints and results. README's "What makes a run's identity" lists them.
NOT_IDENTITY: dict[str, Any] = {"identity": "never"}


class Spec(BaseModel):
    """Base of every spec: unknown keys are refused and instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def identity_omits(self) -> frozenset[str]:
        """Fields this instance's values leave out of a run's identity, besides those marked NOT_IDENTITY."""
        return frozenset()


class FromCheckpoint(Spec):
    """A stage that reads a trained encoder: from a checkpoint URL, or from its run's pretrain stage."""

    checkpoint: str | None = Field(
        None,
        description="DCP step or ckpt dir, or an official/timm .pth or .safetensors URL; the run's pretrain stage "
        "when unset",
    )


class FromPretrained(FromCheckpoint):
    """A stage that can also start from a random encoder, the from-scratch baseline."""

    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="random: the from-scratch (untrained) baseline; no checkpoint is read"
    )

    @model_validator(mode="after")
    def _init_or_checkpoint(self) -> FromPretrained:
        if self.init == "random" and self.checkpoint:
            raise located("checkpoint", "not used with init 'random'; remove one of them")
        return self


class Batching(Spec):
    """A global batch taken in accum_steps micro-batches."""

    batch_size: int = Field(gt=0, description="global batch size")
    accum_steps: int = Field(1, ge=1, description="gradient accumulation micro-steps per optimizer step")

    @model_validator(mode="after")
    def _batch_divides(self) -> Batching:
        if self.batch_size % self.accum_steps:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}")
        return self


class Retention(Spec):
    """How many complete checkpoints a training stage keeps, and what it does when training diverges."""

    keep_last: int = Field(2, ge=1, description="complete checkpoints kept", json_schema_extra=NOT_IDENTITY)
    keep_every: int | None = Field(
        None, ge=1, description="also keep checkpoints at multiples of this step", json_schema_extra=NOT_IDENTITY
    )
    on_nonfinite: Literal["fail", "skip"] = Field(
        "fail",
        description="a non-finite loss, gradient or parameter: fail the stage at once, keeping the last finite "
        "checkpoint (checked at log and checkpoint steps, no per-step sync), or skip that optimizer step (one "
        "host sync per step) and fail after max_skipped_steps",
        json_schema_extra=WHEN_SET,
    )
    max_skipped_steps: int = Field(
        10, ge=0, description="on_nonfinite skip: skipped steps allowed in a stage", json_schema_extra=WHEN_SET
    )


BaseLr = Annotated[float, Field(gt=0, description="lr = base_lr * batch_size / 256")]
MinLr = Annotated[float, Field(ge=0, description="learning rate at the end of the cosine schedule")]
WarmupEpochs = Annotated[float, Field(ge=0, description="epochs of linear learning-rate warmup")]


class WarmupCosine(Spec):
    """A learning rate scaled with the global batch, warmed up linearly, then cosine-annealed to min_lr."""

    base_lr: BaseLr
    min_lr: MinLr = 0.0
    warmup_epochs: WarmupEpochs


Betas = Annotated[tuple[float, float], Field(description="AdamW betas")]


class AdamW(Spec):
    """An AdamW optimizer (decoupled weight decay) with optional gradient-norm clipping."""

    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    betas: Betas = (0.9, 0.999)
    clip_grad: float | None = Field(None, gt=0, description="gradient-norm clip (unset: no clipping)")


CanvasSide = Annotated[int, Field(description="side of the canvas images")]
CanvasObjects = Annotated[tuple[int, int], Field(description="min and max garments per canvas")]
CanvasScale = Annotated[tuple[float, float], Field(description="garment size range, in units of 28 px")]


class Canvas(Spec):
    """Canvases of Fashion-MNIST garments (dataset fashion_mnist_canvas), built once where canvas_dir says."""

    canvas_dir: str | None = Field(None, description="where the canvas set is built; <stage dir>/canvas when unset")
    canvas_size: CanvasSide
    canvas_objects: CanvasObjects
    canvas_scale: CanvasScale

    @model_validator(mode="after")
    def _canvas_fits(self) -> Canvas:
        objects, scale = self.canvas_objects, self.canvas_scale
        if not 1 <= objects[0] <= objects[1]:
            raise ValueError(f"canvas_objects {objects}: need 1 <= min <= max")
        if not 0 < scale[0] <= scale[1]:
            raise ValueError(f"canvas_scale {scale}: need 0 < min <= max")
        return self
