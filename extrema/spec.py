"""Experiment specs: pydantic models, validated at load, torch-free, shared by `extrema` and `launch`.

The experiment, its model and data, the run spec, the stage table and a run's identity live here; each stage's
settings in `extrema.stage_specs`, the base class and the shared field groups in `extrema.spec_groups`. Every spec
is importable from here."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from extrema.spec_groups import LOCATED as LOCATED
from extrema.spec_groups import NOT_IDENTITY, WHEN_SET, Spec, located
from extrema.stage_specs import (
    DetectSpec,
    FinetuneSpec,
    InpaintSpec,
    KnnSpec,
    LocalitySpec,
    PretrainSpec,
    ProbeSpec,
)
from extrema.stage_specs import DownstreamSpec as DownstreamSpec
from extrema.stage_specs import MaskingSpec as MaskingSpec

DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0  # seconds a collective may wait before the stage fails (launcher.resources)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: where its code lives and what it starts from."""

    name: str  # also its settings' field in Experiment and its directory in a run
    module: str  # the module whose `run(spec, stage_dir, attempt)` runs it (imported by the job entry only)
    upstream: str | None = "pretrain"  # the stage whose checkpoint it starts from, unless its spec names another
    single_process: bool = False  # an evaluation that runs in one process only


# The one table of stages, in pipeline order (upstream first). A new stage: its module, its settings class (in
# extrema.stage_specs) with a field of that name in Experiment (and its name in StageName, for the type checker),
# and a row here.
STAGES = (
    Stage("pretrain", "extrema.stages.pretrain", upstream=None),
    Stage("knn", "extrema.stages.knn"),
    Stage("probe", "extrema.stages.probe"),
    Stage("finetune", "extrema.stages.finetune"),
    Stage("detect", "extrema.stages.detect"),
    Stage("inpaint", "extrema.stages.inpaint", single_process=True),
    Stage("locality", "extrema.stages.locality", single_process=True),
)
STAGE_BY_NAME = {s.name: s for s in STAGES}
StageName = Literal["pretrain", "knn", "probe", "finetune", "detect", "inpaint", "locality"]
SINGLE_PROCESS_STAGES = frozenset(s.name for s in STAGES if s.single_process)

# name -> (embed_dim, depth, num_heads, patch_size, img_size). The first four are the paper's
# architectures (patch 16, 224 px); the rest are CPU-sized presets for tests and the demo.
PRESETS: dict[str, tuple[int, int, int, int, int]] = {
    "vit_tiny": (192, 12, 3, 16, 224),
    "vit_small": (384, 12, 6, 16, 224),
    "vit_base": (768, 12, 12, 16, 224),
    "vit_large": (1024, 24, 16, 16, 224),
    "vit_pico": (64, 2, 2, 4, 32),
    "vit_nano": (128, 4, 4, 4, 32),
    "vit_micro": (192, 6, 3, 4, 32),
}


class ModelSpec(Spec):
    """The ViT encoder and the ExtreMA heads."""

    arch: Literal["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_pico", "vit_nano", "vit_micro"] = Field(
        "vit_small", description="ViT size preset (width, depth, heads; patch and image size unless set)"
    )
    img_size: int | None = Field(None, gt=0, description="input resolution; the preset's when unset")
    patch_size: int | None = Field(None, gt=0, description="patch size; the preset's when unset")
    in_chans: int = Field(3, gt=0, description="input image channels")
    cls_token: Literal["cait", "vit", "avgpool"] = Field(
        "cait", description="class-token design: cait (late class attention), vit (input token) or avgpool"
    )
    class_attention_layers: int = Field(2, ge=1, description="class-attention blocks at the end (cls_token cait)")
    layer_scale_init: float = Field(0.1, gt=0, description="initial LayerScale value of the class-attention blocks")
    drop_path_rate: float = Field(
        0.1, ge=0, lt=1, description="stochastic depth rate of the encoder in pretraining (linear over blocks)"
    )
    attn_drop_rate: float = Field(0.0, ge=0, lt=1, description="dropout on attention weights")
    mlp_dim: int = Field(4096, gt=0, description="hidden width of projector and predictor")
    proj_dim: int = Field(256, gt=0, description="output width of projector and predictor")

    @property
    def dims(self) -> tuple[int, int, int]:
        """(embed_dim, depth, num_heads) of the preset."""
        d, depth, heads, _, _ = PRESETS[self.arch]
        return d, depth, heads

    @property
    def resolved_patch_size(self) -> int:
        """Patch size, the preset's unless overridden."""
        return self.patch_size or PRESETS[self.arch][3]

    @property
    def resolved_img_size(self) -> int:
        """Input resolution, the preset's unless overridden."""
        return self.img_size or PRESETS[self.arch][4]

    @property
    def num_patches(self) -> int:
        """Number of patch tokens N of the full image."""
        return (self.resolved_img_size // self.resolved_patch_size) ** 2

    @model_validator(mode="after")
    def _grid_fits(self) -> ModelSpec:
        if self.resolved_img_size % self.resolved_patch_size:
            raise ValueError(
                f"img_size {self.resolved_img_size} is not a multiple of patch_size {self.resolved_patch_size}"
            )
        return self


def visible_count(num_patches: int, ratio: float) -> int:
    """Visible tokens per mask, K = floor(N * (1 - ratio)) computed as the reference does."""
    return int(num_patches * (1 - ratio))


def masks_fit_problem(num_patches: int, num_masks: int, ratio: float, sampling: str) -> str | None:
    """Why the masks of one image cannot be drawn (no visible token, or too many disjoint masks), else None."""
    k = visible_count(num_patches, ratio)
    if k < 1:
        return f"ratio {ratio} leaves no visible token of {num_patches}"
    if sampling == "disjoint" and num_masks * k > num_patches:
        return (
            f"{num_masks} disjoint masks of {k} visible tokens need {num_masks * k} > {num_patches} patches;"
            f" at most {num_patches // k} masks fit at ratio {ratio}"
        )
    return None


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class StorageSpec(Spec):
    """How to reach an object store (s3:// through s3fs). Holds no secret: credentials come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, a profile, an instance role) or the variables named here."""

    endpoint_url: str | None = Field(
        None,
        pattern=r"^https?://[A-Za-z0-9.\-\[\]:]+(/[A-Za-z0-9._~/-]*)?$",
        description="S3-compatible endpoint (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL when unset)",
    )
    region: str | None = Field(
        None, pattern=r"^[a-z0-9-]{1,32}$", description="object-store region (AWS_REGION when unset)"
    )
    profile: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="a named profile of ~/.aws")
    key_env: str | None = Field(None, description="environment variable holding the access key id")
    secret_env: str | None = Field(None, description="environment variable holding the secret access key")
    anon: bool = Field(False, description="unsigned requests (public buckets)")
    connect_timeout_s: float = Field(
        10, gt=0, le=600, description="seconds to wait for a connection to the object store"
    )
    retries: int = Field(3, ge=0, le=20, description="attempts after the first on a failed request")
    cache_bytes: int | None = Field(
        None,
        ge=1,
        description="bound of each reading process's block cache (data.order blocks); two windows of the largest "
        "blocks when unset",
        json_schema_extra=WHEN_SET,
    )
    cache_dir: str | None = Field(
        None,
        description="local directory for the block cache's unlinked files; the temporary directory when unset",
        json_schema_extra=WHEN_SET,
    )

    @model_validator(mode="after")
    def _credentials(self) -> StorageSpec:
        for name in (self.key_env, self.secret_env):
            if name is not None and not ENV_NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not an environment variable name")
        if (self.key_env is None) != (self.secret_env is None):
            raise ValueError("key_env and secret_env go together: name both variables or neither")
        if self.anon and (self.key_env or self.profile):
            raise ValueError("anon: unsigned requests use no credentials; remove key_env/secret_env/profile")
        return self


class DataSpec(Spec):
    """Where images come from and how the two views are made."""

    dataset: Literal["imagefolder", "shards", "fashion_mnist", "synthetic"] = Field(
        "imagefolder", description="source of images: imagefolder URL, shards, Fashion-MNIST, or synthetic"
    )
    root: str | None = Field(
        None,
        description="fsspec URL: ImageFolder root, shard root (`extrema-launch data shard`), or directory of "
        "Fashion-MNIST IDX files; part of a run's identity unless name is set",
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$",
        description="a name for the dataset's content (e.g. imagenet-1k): when set, it stands for the dataset in a "
        "run's identity in place of root, so that a copy of the same images elsewhere keeps every run id",
        json_schema_extra=WHEN_SET,
    )
    storage: StorageSpec | None = Field(
        None, description="object-store settings for s3:// roots (no secrets)", json_schema_extra=NOT_IDENTITY
    )
    decode: Literal["cpu", "gpu"] = Field(
        "cpu", description="gpu: pretraining decodes JPEG batches with nvJPEG on the device (CPU when there is none)"
    )
    reduced_decode: bool = Field(
        True, description="decode JPEGs at 1/2, 1/4 or 1/8 size when the crop is that much larger than the output"
    )
    train_split: str = Field("train", description="subdirectory (or split name) of the training images")
    val_split: str = Field("val", description="subdirectory (or split name) of the validation images")
    augmentation: Literal["spatial_consistent_color", "spatial"] = Field(
        "spatial_consistent_color",
        description="pretraining views: spatially consistent colour jitter, or spatial crops only",
    )
    crop_min: float = Field(
        0.2, gt=0, le=1, description="smallest random-resized-crop area, as a fraction of the image"
    )
    color_on_device: bool | None = Field(
        None, description="apply colour jitter batched on the training device; auto: on GPU only"
    )
    num_workers: int = Field(4, ge=0, description="data-loading processes per rank", json_schema_extra=NOT_IDENTITY)
    synthetic_size: int = Field(256, gt=0, description="images per split of the synthetic test dataset")
    cache_dir: str | None = Field(
        None,
        description="download cache for Fashion-MNIST when no local copy exists",
        json_schema_extra=NOT_IDENTITY,
    )
    order: Literal["global", "blocks"] = Field(
        "global",
        description="sample order of training reads: global: every sample shuffled each epoch; blocks (shards "
        "only): blocks of a shard shuffled, then samples within windows of blocks, read a block at a time from "
        "object stores",
        json_schema_extra=WHEN_SET,
    )
    order_block: int = Field(
        256, ge=1, description="blocks order: consecutive samples of one shard per block", json_schema_extra=WHEN_SET
    )
    order_window: int = Field(
        16, ge=1, description="blocks order: blocks whose samples are shuffled together", json_schema_extra=WHEN_SET
    )

    def identity_omits(self) -> frozenset[str]:
        """root, when name stands for the dataset."""
        return frozenset({"root"}) if self.name else frozenset()

    @model_validator(mode="after")
    def _root_given(self) -> DataSpec:
        if self.dataset in ("imagefolder", "shards") and not self.root:
            raise ValueError(f"root is required for dataset {self.dataset!r}")
        if self.order == "blocks" and self.dataset != "shards":
            raise located("order", "blocks reads shards only (dataset 'shards'); use global")
        if self.decode == "gpu" and self.color_on_device is False:
            raise ValueError("decode 'gpu' finishes the views on the device: color_on_device cannot be false")
        return self


def identity(model: BaseModel, earlier: bool = False) -> Any:
    """The JSON form of a spec that a run's id hashes: every field, less WHEN_SET fields at their default, fields
    marked NOT_IDENTITY and what the spec's `identity_omits` names. `earlier`: the rule before 2026-12 (every field
    less WHEN_SET fields at their default), by which run stores swept before then named their runs."""
    return _prune(model, model.model_dump(mode="json"), earlier)


def _prune(model: BaseModel, dumped: dict[str, Any], earlier: bool) -> dict[str, Any]:
    omitted = model.identity_omits() if isinstance(model, Spec) and not earlier else frozenset()
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        extra = info.json_schema_extra
        marked = extra.get("identity") if isinstance(extra, dict) else None
        if (marked == "when_set" and value == info.default) or (not earlier and (marked == "never" or name in omitted)):
            dumped.pop(name, None)
        elif isinstance(value, BaseModel) and isinstance(dumped.get(name), dict):
            _prune(value, dumped[name], earlier)
    return dumped


class Experiment(Spec):
    """One complete experiment: the model, its data, and the settings of each stage it runs."""

    model: ModelSpec = ModelSpec()
    data: DataSpec
    stages: tuple[StageName, ...] = Field(
        ("pretrain", "knn"),
        description="the stages each run executes (pretrain first when a later stage starts from it)",
    )
    pretrain: PretrainSpec = PretrainSpec()
    knn: KnnSpec = KnnSpec()
    probe: ProbeSpec = ProbeSpec()
    finetune: FinetuneSpec = FinetuneSpec()
    detect: DetectSpec = DetectSpec()
    inpaint: InpaintSpec = InpaintSpec()
    locality: LocalitySpec = LocalitySpec()

    @model_validator(mode="after")
    def _consistent(self) -> Experiment:
        if not self.stages:
            raise located("stages", "at least one stage is required")
        if len(set(self.stages)) != len(self.stages):
            raise located("stages", "each stage may appear once")
        if "detect" in self.stages and self.detect.missing_urls():
            raise located("detect", f"dataset 'coco' needs {', '.join(self.detect.missing_urls())} (fsspec URLs)")
        worst = max(self.inpaint.ratios)
        if "inpaint" in self.stages and visible_count(self.model.num_patches, worst) < 1:
            raise located("inpaint.ratios", f"{worst} leaves no visible token of {self.model.num_patches}")
        m = self.pretrain.masking
        problem = masks_fit_problem(self.model.num_patches, m.num_masks, m.ratio, m.sampling)
        if problem:
            raise located("pretrain.masking", problem)
        return self

    def starts_from(self, stage: str) -> str | None:
        """The stage of this run whose checkpoint `stage` starts from: its upstream, unless its settings name a
        checkpoint or ask for a random init (then None)."""
        upstream = STAGE_BY_NAME[stage].upstream
        settings = self.__dict__.get(stage)  # plain lookups: fast for big sweeps
        values = settings.__dict__ if isinstance(settings, BaseModel) else {}
        if upstream is None or values.get("checkpoint") or values.get("init", "pretrained") != "pretrained":
            return None
        return upstream

    def steps_per_epoch(self, dataset_len: int) -> int:
        """Optimizer steps in one epoch of `dataset_len` images (drop_last)."""
        return max(1, dataset_len // self.pretrain.batch_size)

    def total_steps(self, dataset_len: int) -> int:
        """Total optimizer steps of pretraining."""
        p = self.pretrain
        return p.steps if p.steps is not None else max(1, math.ceil(p.epochs * self.steps_per_epoch(dataset_len)))


class WandbSpec(Spec):
    """Weights & Biases: one W&B run per stage, grouped by sweep and run id, resumed with the stage."""

    project: str = Field(
        min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$", description="W&B project the runs log to"
    )
    entity: str | None = Field(
        None,
        max_length=128,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="W&B team or user (the account's default when unset)",
    )
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline (synced later), online, or disabled"
    )
    tags: list[str] = Field(default_factory=list, max_length=64, description="tags on every run")


class LoggingSpec(Spec):
    """Where metrics go besides metrics.jsonl. Not part of a run's identity."""

    tensorboard: bool = Field(False, description="TensorBoard event files in each stage's tensorboard/ directory")
    wandb: WandbSpec | None = None


class RunSpec(Spec):
    """What one stage job executes: the resolved experiment plus where it sits in its sweep."""

    sweep: str
    run_id: str
    stage: StageName
    experiment: Experiment
    overrides: dict[str, Any] = Field(default_factory=dict, description="the swept values that made this run")
    logging: LoggingSpec = LoggingSpec()
