"""Experiment specs: pydantic models, validated at load, torch-free, shared by `extrema` and `launch`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0  # seconds a collective may wait before the stage fails (launcher.resources)


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline: where its code lives and what it starts from."""

    name: str  # also its settings' field in Experiment and its directory in a run
    module: str  # the module whose `run(spec, stage_dir)` runs it (imported by the job entry only)
    upstream: str | None = "pretrain"  # the stage whose checkpoint it starts from, unless its spec names another
    single_process: bool = False  # an evaluation that runs in one process only


# The one table of stages, in pipeline order (upstream first). A new stage: its module, its settings class with a
# field of that name in Experiment (and its name in StageName, for the type checker), and a row here.
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


LOCATED = "located"  # the pydantic error type of `located` errors; their context holds `at` and `reason`


def located(at: str, reason: str) -> PydanticCustomError:
    """The error a model validator raises about a field below it (`at`: its dotted path from the model): reported
    at that field, with the reason alone."""
    return PydanticCustomError(LOCATED, "{at}: {reason}", {"at": at, "reason": reason})


class Spec(BaseModel):
    """Base of every spec: unknown keys are refused and instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


class MaskingSpec(Spec):
    """Multi-masking of the online view."""

    ratio: float = Field(0.8, ge=0, lt=1, description="fraction of patch tokens dropped per mask")
    num_masks: int = Field(5, ge=1, description="masked views per image (each a student branch)")
    sampling: Literal["disjoint", "independent"] = Field(
        "disjoint", description="masks disjoint from each other, or drawn independently"
    )


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


# A field marked WHEN_SET is part of a run's identity only when it differs from its default: fields added after runs
# exist keep every earlier run's id (`identity`).
WHEN_SET: dict[str, Any] = {"identity": "when_set"}


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
        "Fashion-MNIST IDX files",
    )
    storage: StorageSpec | None = Field(None, description="object-store settings for s3:// roots (no secrets)")
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
    num_workers: int = Field(4, ge=0, description="data-loading processes per rank")
    synthetic_size: int = Field(256, gt=0, description="images per split of the synthetic test dataset")
    cache_dir: str | None = Field(None, description="download cache for Fashion-MNIST when no local copy exists")
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

    @model_validator(mode="after")
    def _root_given(self) -> DataSpec:
        if self.dataset in ("imagefolder", "shards") and not self.root:
            raise ValueError(f"root is required for dataset {self.dataset!r}")
        if self.order == "blocks" and self.dataset != "shards":
            raise located("order", "blocks reads shards only (dataset 'shards'); use global")
        if self.decode == "gpu" and self.color_on_device is False:
            raise ValueError("decode 'gpu' finishes the views on the device: color_on_device cannot be false")
        return self


def canvas_problem(objects: tuple[int, int], scale: tuple[float, float]) -> str | None:
    """Why canvas settings (garments per canvas, garment size range) are invalid, else None."""
    if not 1 <= objects[0] <= objects[1]:
        return f"canvas_objects {objects}: need 1 <= min <= max"
    if not 0 < scale[0] <= scale[1]:
        return f"canvas_scale {scale}: need 0 < min <= max"
    return None


def identity(model: BaseModel) -> Any:
    """The JSON form of a spec that a run's id hashes: every field, less WHEN_SET fields at their default."""
    return _prune(model, model.model_dump(mode="json"))


def _prune(model: BaseModel, dumped: dict[str, Any]) -> dict[str, Any]:
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("identity") == "when_set" and value == info.default:
            dumped.pop(name, None)
        elif isinstance(value, BaseModel) and isinstance(dumped.get(name), dict):
            _prune(value, dumped[name])
    return dumped


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

    keep_last: int = Field(2, ge=1, description="complete checkpoints kept")
    keep_every: int | None = Field(None, ge=1, description="also keep checkpoints at multiples of this step")
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


class PretrainSpec(Retention, Batching):
    """ExtreMA pretraining; defaults are the reference ViT-B recipe."""

    epochs: float = Field(300, gt=0, description="training length in epochs (steps, when set, wins)")
    steps: int | None = Field(None, gt=0, description="total optimizer steps; overrides epochs when set")
    batch_size: int = Field(2048, gt=0, description="global batch size")
    base_lr: float = Field(1.5e-4, gt=0, description="lr = base_lr * batch_size / 256")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine schedule")
    warmup_epochs: float = Field(40, ge=0, description="epochs of linear learning-rate warmup")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay at the start (cosine to weight_decay_end)")
    weight_decay_end: float | None = Field(None, ge=0, description="cosine wd schedule end; constant if unset")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    clip_grad: float | None = Field(None, gt=0, description="gradient-norm clip (unset: no clipping)")
    ema_momentum: float = Field(0.996, ge=0, le=1, description="start of the cosine EMA momentum schedule to 1")
    masking: MaskingSpec = MaskingSpec()
    loss: Literal["byol", "infonce"] = Field(
        "byol", description="byol (regression to the EMA target) or infonce (contrastive)"
    )
    temperature: float = Field(0.2, gt=0, description="InfoNCE temperature")
    symmetric: bool = Field(False, description="also swap the two views' roles (loss on both directions)")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    log_every: int = Field(20, ge=1, description="steps between loss logs (the only host syncs)")
    ckpt_every: int = Field(1000, ge=1, description="steps between checkpoints")
    async_save: bool = Field(False, description="write periodic checkpoints in the background")
    strategy: Literal["fsdp", "hsdp", "ddp", "none"] = Field(
        "fsdp",
        description="data parallelism with several processes: fsdp shards over every rank, hsdp shards within a node "
        "and replicates across nodes, ddp replicates",
    )
    compile: bool = Field(
        False,
        description="torch.compile each transformer block before sharding (masks have a fixed size: static shapes)",
    )
    knn_monitor: bool = Field(True, description="kNN accuracy (knn settings) at the start, periodically and at the end")
    knn_every_epochs: float | None = Field(None, gt=0, description="kNN monitor period; only at start and end if unset")
    init_from: str | None = Field(
        None, description="start from this official ExtreMA .pth or DCP step (every part, both branches); resuming wins"
    )
    init_from_mode: Literal["weights", "resume"] = Field(
        "weights",
        description="weights: init_from's weights with a fresh optimizer at step 0; resume: also its optimizer state "
        "and position (an official checkpoint's epoch x steps per epoch, a DCP step's step), so the lr, weight-decay "
        "and EMA momentum schedules continue; this stage's own checkpoint wins either way",
        json_schema_extra=WHEN_SET,
    )
    seed: int = Field(0, description="random seed of the stage (init, masks, data order)")

    @model_validator(mode="after")
    def _resume_needs_a_source(self) -> PretrainSpec:
        if self.init_from_mode == "resume" and not self.init_from:
            raise located("init_from_mode", "resume needs init_from (the checkpoint to resume)")
        return self


class KnnSpec(FromCheckpoint):
    """Weighted kNN on L2-normalised features (the DINO protocol)."""

    k: int = Field(20, ge=1, description="neighbours that vote")
    temperature: float = Field(0.07, gt=0, description="temperature of the similarity-weighted vote")
    encoder: Literal["ema", "student"] = Field("ema", description="which encoder's features: ema (teacher) or student")
    feature: Literal["instance", "instance_prenorm", "patch_mean"] = Field(
        "instance", description="class token after norm, before norm, or mean of patch tokens"
    )
    bank_size: int | None = Field(10000, gt=0, description="training images in the memory bank; all when unset")
    val_size: int | None = Field(None, gt=0, description="validation images evaluated; all when unset")
    batch_size: int = Field(256, gt=0, description="images per forward pass, per process")


class DownstreamSpec(Retention, FromPretrained, Batching):
    """Settings shared by the stages that train on labels: weight source, data subsets, evaluation, resume."""

    batch_size: int = Field(1024, gt=0, description="global batch size")
    train_size: int | None = Field(None, gt=0, description="seeded subset of training images; all when unset")
    val_fraction: float | None = Field(
        None, gt=0, lt=1, description="validate on this seeded fraction of the train split instead of the val split"
    )
    val_size: int | None = Field(None, gt=0, description="validation images evaluated; all when unset")
    eval_batch_size: int = Field(256, gt=0, description="images per forward pass at evaluation, per process")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    ckpt_every: int | None = Field(None, ge=1, description="steps between checkpoints besides epoch ends")
    seed: int = Field(0, description="random seed of the stage")


class ProbeSpec(DownstreamSpec):
    """Linear probe (BatchNorm without affine + Linear) on a frozen encoder; defaults are the paper's Table 3."""

    encoder: Literal["ema", "student"] = Field("ema", description="which frozen encoder is probed: ema or student")
    feature: Literal["instance", "patch_mean"] = Field("instance", description="class token or mean of patch tokens")
    final_norm: bool = Field(False, description="apply the encoder's final LayerNorm; the reference drops it")
    epochs: float = Field(90, gt=0, description="training epochs of the linear head")
    batch_size: int = Field(4096, gt=0, description="global batch size")
    accum_steps: int = Field(1, ge=1, description="encoder micro-batches per step; the head sees the whole batch")
    optimizer: Literal["lars", "sgd"] = Field("lars", description="LARS (as the paper) or SGD")
    base_lr: float = Field(0.1, gt=0, description="lr = base_lr * batch_size / 256")
    min_lr: float = Field(0.0, ge=0, description="learning rate at the end of the cosine schedule")
    warmup_epochs: float = Field(10, ge=0, description="epochs of linear learning-rate warmup")
    weight_decay: float = Field(0.0, ge=0, description="weight decay of the linear head")
    momentum: float = Field(0.9, ge=0, lt=1, description="optimizer momentum")


class FinetuneSpec(DownstreamSpec):
    """End-to-end finetuning of the encoder with a new head; defaults are the paper's Table 2 (ViT-B)."""

    encoder: Literal["student", "ema"] = Field(
        "student", description="which pretrained encoder is fine-tuned: student or ema"
    )
    img_size: int | None = Field(None, gt=0, description="finetuning resolution; the model's when unset")
    pos_embed: Literal["learnable", "fixed"] = Field("learnable", description="learnable: initialised from sin-cos")
    epochs: float = Field(100, gt=0, description="training epochs")
    base_lr: float = Field(1e-3, gt=0, description="lr = base_lr * batch_size / 256")
    min_lr: float = Field(1e-6, ge=0, description="learning rate at the end of the cosine schedule")
    warmup_epochs: float = Field(5, ge=0, description="epochs of linear learning-rate warmup")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    layer_decay: float = Field(0.75, gt=0, le=1, description="layer-wise learning-rate decay per block from the top")
    drop_path_rate: float = Field(0.1, ge=0, lt=1, description="stochastic depth rate while fine-tuning")
    clip_grad: float | None = Field(None, gt=0, description="gradient-norm clip (unset: no clipping)")
    randaugment_ops: int = Field(2, ge=0, description="RandAugment operations per image; 0 disables it")
    randaugment_magnitude: int = Field(9, ge=0, le=30, description="RandAugment magnitude (0-30)")
    random_erasing: float = Field(0.25, ge=0, le=1, description="probability of erasing a random box")
    mixup: float = Field(0.8, ge=0, description="MixUp alpha; 0 disables it")
    cutmix: float = Field(1.0, ge=0, description="CutMix alpha; 0 disables it")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the cross-entropy")


class DetectSpec(Retention, FromPretrained):
    """Mask R-CNN transfer with the ViT as backbone (the CAE recipe); defaults: the paper's Table 1 (ViT-B, COCO 1x)."""

    encoder: Literal["student", "ema"] = Field(
        "student", description="which pretrained encoder is the backbone: student or ema"
    )
    dataset: Literal["coco", "fashion_mnist_canvas"] = Field(
        "coco", description="COCO-format files at the URLs below, or the canvas set built from data's Fashion-MNIST"
    )
    train_annotations: str | None = Field(None, description="fsspec URL of the training annotations JSON (COCO)")
    train_images: str | None = Field(None, description="fsspec URL of the training image directory")
    val_annotations: str | None = Field(None, description="fsspec URL of the validation annotations JSON")
    val_images: str | None = Field(None, description="fsspec URL of the validation image directory")
    canvas_dir: str | None = Field(None, description="where the canvas set is built; <stage dir>/canvas when unset")
    canvas_size: int = Field(128, ge=32, description="side of the canvas images")
    canvas_train_images: int = Field(
        2000, gt=0, description="canvases built for training (dataset fashion_mnist_canvas)"
    )
    canvas_val_images: int = Field(
        500, gt=0, description="canvases built for validation (dataset fashion_mnist_canvas)"
    )
    canvas_objects: tuple[int, int] = Field((1, 4), description="min and max garments per canvas")
    canvas_scale: tuple[float, float] = Field((0.8, 1.5), description="garment size range, in units of 28 px")
    epochs: float = Field(12, gt=0, description="training epochs")
    lr_steps: tuple[float, ...] = Field(
        (9, 11), description="epochs of the 12-epoch schedule after which the lr drops 10x; scaled by epochs / 12"
    )
    batch_size: int = Field(32, gt=0, description="global batch size (CAE: 2 images x 16 GPUs)")
    lr: float = Field(3e-4, gt=0, description="peak AdamW lr at this batch size (not rescaled)")
    warmup_steps: int = Field(500, ge=0, description="linear warmup from warmup_ratio * lr")
    warmup_ratio: float = Field(
        0.001, gt=0, le=1, description="learning rate at the start of warmup, as a fraction of lr"
    )
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    layer_decay: float = Field(0.75, gt=0, le=1, description="layer-wise learning-rate decay of the backbone")
    drop_path_rate: float = Field(0.2, ge=0, lt=1, description="stochastic depth rate of the backbone")
    clip_grad: float | None = Field(None, gt=0, description="gradient-norm clip (unset: no clipping)")
    train_scales: tuple[int, ...] = Field(
        tuple(range(480, 801, 32)), description="shorter sides drawn for multi-scale training"
    )
    max_size: int = Field(1333, gt=0, description="longer side limit of training and test images")
    crop_scales: tuple[int, ...] | None = Field(
        (400, 500, 600), description="DETR crop branch: resize to one of these, crop, resize again; off when unset"
    )
    crop_size: tuple[int, int] = Field((384, 600), description="min and max side of the crop branch's random crop")
    test_size: int = Field(800, gt=0, description="shorter side at evaluation")
    fpn_channels: int = Field(256, gt=0, description="channels of the feature pyramid")
    box_head_dim: int = Field(1024, gt=0, description="width of the fully connected layer of the 4conv1fc box head")
    anchor_sizes: tuple[int, int, int, int, int] = Field(
        (32, 64, 128, 256, 512), description="RPN anchor size of each FPN level (strides 4 to 64)"
    )
    rpn_batch_size: int = Field(256, gt=0, description="anchors sampled per image for the RPN loss")
    rpn_proposals: int = Field(
        1000, gt=0, description="RPN proposals kept per image after NMS (from 2x that many per level in training)"
    )
    roi_batch_size: int = Field(512, gt=0, description="proposals sampled per image for the box and mask heads")
    detections_per_image: int = Field(100, gt=0, description="most detections kept per image at evaluation")
    activation_checkpointing: bool = Field(False, description="recompute transformer blocks in the backward pass")
    train_size: int | None = Field(None, gt=0, description="seeded subset of training images; all when unset")
    val_size: int | None = Field(None, gt=0, description="seeded subset of validation images; all when unset")
    log_every: int = Field(50, ge=1, description="steps between loss logs (and at every epoch end)")
    eval_every_epochs: float | None = Field(None, gt=0, description="COCO evaluation period; only at the end if unset")
    eval_batch_size: int = Field(2, gt=0, description="images per forward at evaluation, per process")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: the backbone in bf16 autocast on GPU, fp32 on CPU; the heads always run in fp32"
    )
    ckpt_every: int | None = Field(None, ge=1, description="steps between checkpoints besides epoch ends")
    seed: int = Field(0, description="random seed of the stage")

    @model_validator(mode="after")
    def _consistent(self) -> DetectSpec:
        problem = canvas_problem(self.canvas_objects, self.canvas_scale)
        if problem:
            raise ValueError(problem)
        if not 0 < self.crop_size[0] <= self.crop_size[1]:
            raise ValueError(f"crop_size {self.crop_size}: need 0 < min <= max")
        if not self.train_scales or min(self.train_scales) <= 0:
            raise ValueError("train_scales: at least one positive size is required")
        if any(not 0 <= s <= 12 for s in self.lr_steps):
            raise ValueError(f"lr_steps {self.lr_steps}: each must lie in [0, 12] (epochs of the 1x schedule)")
        return self

    def missing_urls(self) -> list[str]:
        """The COCO file URLs the `coco` dataset needs but the spec leaves unset."""
        urls = ("train_annotations", "train_images", "val_annotations", "val_images")
        return [u for u in urls if not getattr(self, u)] if self.dataset == "coco" else []


class InpaintSpec(FromCheckpoint):
    """Inpainting (Figure 4): a light pixel decoder trained briefly on the frozen encoder's visible tokens."""

    encoder: Literal["student", "ema"] = Field("student", description="student: the branch that saw masked inputs")
    ratios: tuple[float, ...] = Field(
        (0.5, 0.75, 0.9), description="masking ratios: drawn per training batch, each scored and shown"
    )
    decoder_dim: int = Field(128, gt=0, description="decoder width (divisible by 4 and by decoder_heads)")
    decoder_depth: int = Field(2, ge=1, description="decoder transformer blocks")
    decoder_heads: int = Field(4, ge=1, description="attention heads of the inpainting decoder")
    steps: int = Field(1000, gt=0, description="decoder training steps")
    batch_size: int = Field(128, gt=0, description="images per step, per process")
    lr: float = Field(1e-3, gt=0, description="peak AdamW lr (cosine, after warmup_steps)")
    warmup_steps: int = Field(50, ge=0, description="steps of linear learning-rate warmup")
    weight_decay: float = Field(0.05, ge=0, description="AdamW weight decay of the decoder")
    train_size: int | None = Field(10000, gt=0, description="seeded subset of training images; all when unset")
    val_size: int | None = Field(1000, gt=0, description="held-out val-split images scored; all when unset")
    figure_images: int = Field(8, ge=1, le=32, description="images shown in the figure")
    seed: int = Field(0, description="random seed of the stage")

    @model_validator(mode="after")
    def _consistent(self) -> InpaintSpec:
        if not self.ratios or not all(0 <= r < 1 for r in self.ratios):
            raise ValueError(f"ratios {self.ratios}: give at least one, each in [0, 1)")
        if self.decoder_dim % 4 or self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim {self.decoder_dim} must be divisible by 4 and by decoder_heads")
        return self


class LocalitySpec(FromPretrained):
    """Figure 2: how well the [cls] attention localises objects (DINO's protocol), scored against ground truth.

    The class token's attention over the patches (mean over heads; also each head alone) keeps the patches that
    hold `mass` of it; scored by Jaccard against the union of the objects' masks and by CorLoc (the box of the
    largest 4-connected component of kept patches hits an object's box at IoU >= 0.5). `avgpool` has no class
    token: its result says not applicable.
    """

    encoder: Literal["ema", "student"] = Field(
        "ema", description="which encoder's attention is measured: ema or student"
    )
    mass: float = Field(0.6, gt=0, lt=1, description="share of the attention mass the kept patches hold")
    dataset: Literal["coco", "fashion_mnist_canvas"] = Field(
        "fashion_mnist_canvas", description="a COCO-format set with masks at the URLs below, or garment canvases"
    )
    annotations: str | None = Field(None, description="fsspec URL of the COCO annotations JSON (e.g. val2017)")
    images: str | None = Field(None, description="fsspec URL of its image directory")
    img_size: int | None = Field(None, gt=0, description="images are resized to this square; the model's when unset")
    max_images: int | None = Field(None, gt=0, description="seeded subset of the images with objects; all when unset")
    canvas_dir: str | None = Field(None, description="where the canvas set is built; <stage dir>/canvas when unset")
    canvas_size: int = Field(48, ge=16, description="side of the canvas images")
    canvas_images: int = Field(
        500, gt=0, description="canvases built for the measurement (dataset fashion_mnist_canvas)"
    )
    canvas_objects: tuple[int, int] = Field((1, 2), description="min and max garments per canvas")
    canvas_scale: tuple[float, float] = Field((0.8, 1.2), description="garment size range, in units of 28 px")
    batch_size: int = Field(64, gt=0, description="images per forward pass")
    seed: int = Field(0, description="random seed of the stage")

    @model_validator(mode="after")
    def _consistent(self) -> LocalitySpec:
        if self.dataset == "coco" and not (self.annotations and self.images):
            raise ValueError("dataset 'coco' needs annotations and images (fsspec URLs)")
        problem = canvas_problem(self.canvas_objects, self.canvas_scale)
        if problem:
            raise ValueError(problem)
        return self


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
