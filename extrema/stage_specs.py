"""The settings of each stage of a run (pretrain, knn, probe, finetune, detect, inpaint, locality): pydantic models,
torch-free, built from the field groups of `extrema.spec_groups`; `extrema.spec.Experiment` holds one of each."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from extrema.spec_groups import (
    NOT_IDENTITY,
    WHEN_SET,
    AdamW,
    BaseLr,
    Batching,
    Betas,
    Canvas,
    CanvasObjects,
    CanvasScale,
    CanvasSide,
    FromCheckpoint,
    FromPretrained,
    MinLr,
    Retention,
    Spec,
    WarmupCosine,
    WarmupEpochs,
    located,
)


class MaskingSpec(Spec):
    """Multi-masking of the online view."""

    ratio: float = Field(0.8, ge=0, lt=1, description="fraction of patch tokens dropped per mask")
    num_masks: int = Field(5, ge=1, description="masked views per image (each a student branch)")
    sampling: Literal["disjoint", "independent"] = Field(
        "disjoint", description="masks disjoint from each other, or drawn independently"
    )


class PretrainSpec(AdamW, WarmupCosine, Retention, Batching):
    """ExtreMA pretraining; defaults are the reference ViT-B recipe."""

    epochs: float = Field(300, gt=0, description="training length in epochs (steps, when set, wins)")
    steps: int | None = Field(None, gt=0, description="total optimizer steps; overrides epochs when set")
    batch_size: int = Field(2048, gt=0, description="global batch size")
    base_lr: BaseLr = 1.5e-4
    warmup_epochs: WarmupEpochs = 40
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay at the start (cosine to weight_decay_end)")
    weight_decay_end: float | None = Field(None, ge=0, description="cosine wd schedule end; constant if unset")
    betas: Betas = (0.9, 0.95)
    ema_momentum: float = Field(0.996, ge=0, le=1, description="start of the cosine EMA momentum schedule to 1")
    masking: MaskingSpec = MaskingSpec()
    loss: Literal["byol", "infonce"] = Field(
        "byol", description="byol (regression to the EMA target) or infonce (contrastive)"
    )
    temperature: float = Field(0.2, gt=0, description="InfoNCE temperature")
    symmetric: bool = Field(False, description="also swap the two views' roles (loss on both directions)")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on GPU, fp32 on CPU")
    log_every: int = Field(
        20, ge=1, description="steps between loss logs (the only host syncs)", json_schema_extra=NOT_IDENTITY
    )
    ckpt_every: int = Field(1000, ge=1, description="steps between checkpoints", json_schema_extra=NOT_IDENTITY)
    async_save: bool = Field(
        False, description="write periodic checkpoints in the background", json_schema_extra=NOT_IDENTITY
    )
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
    knn_every_epochs: float | None = Field(
        None, gt=0, description="kNN monitor period; only at start and end if unset", json_schema_extra=NOT_IDENTITY
    )
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
    ckpt_every: int | None = Field(
        None, ge=1, description="steps between checkpoints besides epoch ends", json_schema_extra=NOT_IDENTITY
    )
    seed: int = Field(0, description="random seed of the stage")


class ProbeSpec(WarmupCosine, DownstreamSpec):
    """Linear probe (BatchNorm without affine + Linear) on a frozen encoder; defaults are the paper's Table 3."""

    encoder: Literal["ema", "student"] = Field("ema", description="which frozen encoder is probed: ema or student")
    feature: Literal["instance", "patch_mean"] = Field("instance", description="class token or mean of patch tokens")
    final_norm: bool = Field(False, description="apply the encoder's final LayerNorm; the reference drops it")
    epochs: float = Field(90, gt=0, description="training epochs of the linear head")
    batch_size: int = Field(4096, gt=0, description="global batch size")
    accum_steps: int = Field(1, ge=1, description="encoder micro-batches per step; the head sees the whole batch")
    optimizer: Literal["lars", "sgd"] = Field("lars", description="LARS (as the paper) or SGD")
    base_lr: BaseLr = 0.1
    warmup_epochs: WarmupEpochs = 10
    weight_decay: float = Field(0.0, ge=0, description="weight decay of the linear head")
    momentum: float = Field(0.9, ge=0, lt=1, description="optimizer momentum")


class FinetuneSpec(AdamW, WarmupCosine, DownstreamSpec):
    """End-to-end finetuning of the encoder with a new head; defaults are the paper's Table 2 (ViT-B)."""

    encoder: Literal["student", "ema"] = Field(
        "student", description="which pretrained encoder is fine-tuned: student or ema"
    )
    img_size: int | None = Field(None, gt=0, description="finetuning resolution; the model's when unset")
    pos_embed: Literal["learnable", "fixed"] = Field("learnable", description="learnable: initialised from sin-cos")
    epochs: float = Field(100, gt=0, description="training epochs")
    base_lr: BaseLr = 1e-3
    min_lr: MinLr = 1e-6
    warmup_epochs: WarmupEpochs = 5
    layer_decay: float = Field(0.75, gt=0, le=1, description="layer-wise learning-rate decay per block from the top")
    drop_path_rate: float = Field(0.1, ge=0, lt=1, description="stochastic depth rate while fine-tuning")
    randaugment_ops: int = Field(2, ge=0, description="RandAugment operations per image; 0 disables it")
    randaugment_magnitude: int = Field(9, ge=0, le=30, description="RandAugment magnitude (0-30)")
    random_erasing: float = Field(0.25, ge=0, le=1, description="probability of erasing a random box")
    mixup: float = Field(0.8, ge=0, description="MixUp alpha; 0 disables it")
    cutmix: float = Field(1.0, ge=0, description="CutMix alpha; 0 disables it")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing of the cross-entropy")


class DetectSpec(Canvas, AdamW, Retention, FromPretrained):
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
    canvas_size: CanvasSide = Field(128, ge=32)
    canvas_train_images: int = Field(
        2000, gt=0, description="canvases built for training (dataset fashion_mnist_canvas)"
    )
    canvas_val_images: int = Field(
        500, gt=0, description="canvases built for validation (dataset fashion_mnist_canvas)"
    )
    canvas_objects: CanvasObjects = (1, 4)
    canvas_scale: CanvasScale = (0.8, 1.5)
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
    layer_decay: float = Field(0.75, gt=0, le=1, description="layer-wise learning-rate decay of the backbone")
    drop_path_rate: float = Field(0.2, ge=0, lt=1, description="stochastic depth rate of the backbone")
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
    log_every: int = Field(
        50, ge=1, description="steps between loss logs (and at every epoch end)", json_schema_extra=NOT_IDENTITY
    )
    eval_every_epochs: float | None = Field(
        None, gt=0, description="COCO evaluation period; only at the end if unset", json_schema_extra=NOT_IDENTITY
    )
    eval_batch_size: int = Field(2, gt=0, description="images per forward at evaluation, per process")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: the backbone in bf16 autocast on GPU, fp32 on CPU; the heads always run in fp32"
    )
    ckpt_every: int | None = Field(
        None, ge=1, description="steps between checkpoints besides epoch ends", json_schema_extra=NOT_IDENTITY
    )
    seed: int = Field(0, description="random seed of the stage")

    @model_validator(mode="after")
    def _consistent(self) -> DetectSpec:
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


class LocalitySpec(Canvas, FromPretrained):
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
    canvas_size: CanvasSide = Field(48, ge=16)
    canvas_images: int = Field(
        500, gt=0, description="canvases built for the measurement (dataset fashion_mnist_canvas)"
    )
    canvas_objects: CanvasObjects = (1, 2)
    canvas_scale: CanvasScale = (0.8, 1.2)
    batch_size: int = Field(64, gt=0, description="images per forward pass")
    seed: int = Field(0, description="random seed of the stage")

    @model_validator(mode="after")
    def _consistent(self) -> LocalitySpec:
        if self.dataset == "coco" and not (self.annotations and self.images):
            raise ValueError("dataset 'coco' needs annotations and images (fsspec URLs)")
        return self
