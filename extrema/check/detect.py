"""One Mask R-CNN training step of a detect stage configuration under fake tensors: memory per rank by kind, the
peak, and FLOPs, as a bound at the configuration's caps (`extrema.check.downstream` measures the other stages).

What a detection step holds depends on its data: the padded size of the batch, the objects in it, the proposals
NMS keeps and the RoIs the samplers draw. The bound takes each at its cap: each image the largest the training resize
can give (`image_sides`), lying and standing in turn, so that the batch pads to the largest it can (`image_bound`),
`objects` objects in each (their masks at the image's own size; COCO: a stated 100, and COCO 2017's 80 classes), the
RPN's `rpn_proposals` proposals kept per image with the objects' boxes added, `roi_batch_size` RoIs per
image sampled for the box head and their positive fraction for the mask head. The model is the stage's own
(`build_model` on the meta device, then given fake storage) with its optimizer (AdamW over layer-decayed groups)
after one step; the step runs the stage's modules in the stage's order: the transform's normalised, padded batch,
the ViT pyramid and FPN (bf16 autocast on a GPU target, as the stage), the RPN head over every anchor, the anchors'
matching against the objects, the box head on RoIs pooled from the finest level, the mask head on the positive
ones and torchvision's mask loss, then the backward pass and the optimizer's step. NMS, the matchers' thresholds and
the samplers' draws choose values, not sizes: they are left out, their outputs taken at the caps; RoIs are pooled
from one level, with the model's pools' output sizes and sampling (a pooled RoI has one size whatever level it
comes from; the backward pass then writes one level's gradient where the real step writes several levels' parts of
theirs). Several ranks run DDP: the step is the unwrapped one plus DDP's gradient buckets, as for finetuning. With
one image per rank, the largest batch that fits is extrapolated from the activations of an image padded as in a
batch of two (the pixels' ratio), since every image from the second on pads to the larger square.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign, box_iou, roi_align

from extrema.check.downstream import FASHION_MNIST_CLASSES, applies, first_step, measure
from extrema.check.estimate import Setting, Target, fake_storage, fake_world, heading
from extrema.models.detector import STRIDES
from extrema.spec import DetectSpec, Experiment
from extrema.stages.detect import build_model, detect_optimizer

COCO_CLASSES = 80  # object categories of COCO 2017's instance annotations
COCO_OBJECTS = 100  # objects per image the bound assumes for COCO (its densest training images have fewer)
Step = Callable[[], object]


@dataclass(frozen=True)
class Caps:
    """The sizes one rank's step is bounded at: images, their padded height and width, each image's shorter and
    longer side, objects per image, proposals kept per image (objects added), RoIs sampled per image and the
    positive ones among them."""

    images: int
    height: int
    width: int
    short: int
    long: int
    objects: int
    proposals: int
    rois: int
    positives: int


def padded(side: int, divisor: int) -> int:
    """`side` rounded up to a multiple of `divisor`, as the transform pads a batch."""
    return -(-side // divisor) * divisor


def image_sides(d: DetectSpec, aspect: float | None) -> tuple[int, int]:
    """The largest (shorter, longer) sides of one training image: the shorter at most the largest training scale,
    the longer at most `max_size` (and at most `aspect` times the shorter when the images' aspect ratio is bounded,
    None: not)."""
    short = min(max(d.train_scales), d.max_size)
    return short, (d.max_size if aspect is None else min(d.max_size, math.ceil(short * aspect)))


def image_bound(d: DetectSpec, aspect: float | None, images: int, divisor: int) -> tuple[int, int]:
    """The largest padded (height, width) of a rank's batch: one image lies (shorter side up); with two or more,
    one may stand and one lie, so both sides reach the longer."""
    short, long = image_sides(d, aspect)
    height, width = (long, long) if images > 1 else (short, long)
    return padded(height, divisor), padded(width, divisor)


def image_sizes(c: Caps) -> list[tuple[int, int]]:
    """Each image's own (height, width) at the bound, before the batch pads them: lying and standing in turn."""
    return [(c.short, c.long) if j % 2 == 0 else (c.long, c.short) for j in range(c.images)]


def data_bounds(d: DetectSpec) -> tuple[int, int, float | None]:
    """Classes, objects per image and the bound of the images' aspect ratio of the stage's dataset: COCO's (aspect
    unbounded), or the canvases' (square; the crop branch's random crop stretches them by at most its max / min)."""
    if d.dataset == "coco":
        return COCO_CLASSES, COCO_OBJECTS, None
    aspect = d.crop_size[1] / d.crop_size[0] if d.crop_scales else 1.0
    return FASHION_MNIST_CLASSES, d.canvas_objects[1], aspect


def caps(d: DetectSpec, model: MaskRCNN, images: int, objects: int, aspect: float | None) -> Caps:
    """The step's sizes at the stage's caps (the samplers' sizes read from the built model)."""
    height, width = image_bound(d, aspect, images, model.transform.size_divisible)
    sampler = model.roi_heads.fg_bg_sampler
    rois = min(sampler.batch_size_per_image, d.rpn_proposals + objects)
    positives = min(rois, int(sampler.batch_size_per_image * sampler.positive_fraction))
    return Caps(images, height, width, *image_sides(d, aspect), objects, d.rpn_proposals + objects, rois, positives)


def fake_targets(c: Caps, device: torch.device) -> list[dict[str, Tensor]]:
    """What `model_target` hands the model per image, at the caps, its masks at the image's own size (call under
    the fake mode)."""
    return [
        {
            "boxes": torch.zeros(c.objects, 4, device=device),
            "labels": torch.ones(c.objects, dtype=torch.int64, device=device),
            "masks": torch.zeros(c.objects, h, w, dtype=torch.uint8, device=device),
        }
        for h, w in image_sizes(c)
    ]


def rpn_losses(model: MaskRCNN, images: Any, features: list[Tensor], targets: list[dict[str, Tensor]]) -> Tensor:
    """The RPN's head over every anchor, its proposals decoded, each image's anchors matched against its objects
    and the losses over `rpn_batch_size` sampled anchors (half of them positive at most)."""
    rpn = model.rpn
    objectness, deltas = rpn.head(features)
    anchors = rpn.anchor_generator(images, features)
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    with torch.no_grad():
        rpn.box_coder.decode(deltas.detach(), anchors)
    goals = []
    for image_anchors, target in zip(anchors, targets):
        quality = box_iou(target["boxes"], image_anchors)
        _, matches = quality.max(dim=0)
        goals.append(rpn.box_coder.encode_single(target["boxes"][matches], image_anchors))
    per_image = deltas.shape[0] // len(anchors)
    sampler = rpn.fg_bg_sampler  # no more anchors sampled than an image has
    sampled = min(sampler.batch_size_per_image, per_image)
    positives = min(int(sampler.batch_size_per_image * sampler.positive_fraction), sampled)
    chosen = torch.cat([i * per_image + torch.arange(sampled) for i in range(len(anchors))])
    positive = torch.cat([i * per_image + torch.arange(positives) for i in range(len(anchors))])
    box = F.smooth_l1_loss(deltas[positive], torch.cat(goals)[positive], beta=1 / 9, reduction="sum")
    score = F.binary_cross_entropy_with_logits(objectness[chosen].flatten(), torch.zeros(chosen.shape[0]))
    return score + box / chosen.shape[0]


def pooled(finest: Tensor, rois: Tensor, pool: MultiScaleRoIAlign) -> Tensor:
    """RoIs pooled as the model's MultiScaleRoIAlign `pool` pools them (its output size and sampling), every one
    from the finest level: each level's pooled RoIs written into one zeroed result."""
    result = torch.zeros(rois.shape[0], finest.shape[1], *pool.output_size, dtype=finest.dtype)
    result[torch.arange(rois.shape[0])] = roi_align(finest, rois, pool.output_size, 1 / STRIDES[0], pool.sampling_ratio)
    return result


def roi_losses(model: MaskRCNN, finest: Tensor, targets: list[dict[str, Tensor]], c: Caps) -> Tensor:
    """Each image's proposals (objects added) matched against its objects, `rois` of them pooled and through the
    box head and predictor, `positives` through the mask head and predictor, and the heads' losses."""
    heads = model.roi_heads
    proposals = [torch.zeros(c.proposals, 4) for _ in targets]
    for image_proposals, target in zip(proposals, targets):
        box_iou(target["boxes"], image_proposals).max(dim=0)
    rois = [torch.cat([torch.full((c.rois, 1), float(i)), p[: c.rois]], dim=1) for i, p in enumerate(proposals)]
    boxes = heads.box_head(pooled(finest, torch.cat(rois), heads.box_roi_pool))
    logits, regression = heads.box_predictor(boxes)
    labels = torch.zeros(logits.shape[0], dtype=torch.int64)
    positive = torch.cat([i * c.rois + torch.arange(c.positives) for i in range(c.images)])
    chosen = regression.reshape(logits.shape[0], -1, 4)[positive, labels[positive]]
    box = F.smooth_l1_loss(chosen, torch.zeros_like(chosen), beta=1 / 9, reduction="sum") / logits.shape[0]
    mask_rois = torch.cat([r[: c.positives] for r in rois])
    masks = heads.mask_predictor(heads.mask_head(pooled(finest, mask_rois, heads.mask_roi_pool)))
    matched = [torch.zeros(c.positives, dtype=torch.int64) for _ in targets]
    mask = maskrcnn_loss(
        masks, [p[: c.positives] for p in proposals], [t["masks"] for t in targets],
        [t["labels"] for t in targets], matched,
    )  # fmt: skip
    return F.cross_entropy(logits, labels) + box + mask


def detect_step(
    model: MaskRCNN, images: list[Tensor], targets: list[dict[str, Tensor]], c: Caps, apply: Callable[[Tensor], bool]
) -> None:
    """The stage's training step at the caps: the transform, the backbone, the RPN and RoI heads' losses summed,
    the backward pass, then `apply` (the optimizer's step)."""
    batch, targets = model.transform(images, targets)
    features = model.backbone(batch.tensors)
    levels = list(features.values())
    loss = rpn_losses(model, batch, levels, targets) + roi_losses(model, levels[0], targets, c)
    loss.backward()
    apply(loss)


def detect_parts(
    exp: Experiment, setting: Setting, fake: FakeTensorMode, device: torch.device, per_rank: int
) -> tuple[MaskRCNN, torch.optim.Optimizer, list[Tensor], Step, Caps]:
    """The detector and its optimizer with fake storage, a batch at the caps, and the step over them."""
    d = exp.detect
    classes, objects, aspect = data_bounds(d)
    with torch.device("meta"):
        model = build_model(exp, d, classes, None, setting.amp)
    model = fake_storage(model, fake, device)
    anchors = model.rpn.anchor_generator  # its base anchors are attributes, not buffers: made here, then faked
    anchors.cell_anchors = [
        fake.from_tensor(anchors.generate_anchors(s, a)) for s, a in zip(anchors.sizes, anchors.aspect_ratios)
    ]
    c = caps(d, model, per_rank, objects, aspect)
    with fake:
        optimizer = detect_optimizer(model, d)
        first_step([q for q in model.parameters() if q.requires_grad], optimizer)
        images = [torch.zeros(exp.model.in_chans, h, w, device=device) for h, w in image_sizes(c)]
        targets = fake_targets(c, device)
    apply = applies(optimizer, list(model.parameters()), d.clip_grad)
    model.train()

    def step() -> None:
        detect_step(model, images, targets, c, apply)

    inputs = [*images, *(t for target in targets for t in target.values())]
    return model, optimizer, inputs, step, c


def estimate_detect(
    exp: Experiment, nodes: int, processes_per_node: int, target: Target, rank: int = 0
) -> dict[str, Any]:
    """Memory of one detect step per rank at the configuration's caps, by kind and at the peak, and its FLOPs, at
    the job's world size. Call in a fresh process: it joins a fake process group as `rank`."""
    world_size = nodes * processes_per_node
    d = exp.detect
    if d.batch_size % world_size:
        raise ValueError(f"detect.batch_size {d.batch_size} is not divisible by {world_size} ranks")
    os.environ["LOCAL_WORLD_SIZE"] = str(processes_per_node)
    world = fake_world(world_size, rank)
    setting = Setting.of(exp, target, stage="detect")
    per_rank = d.batch_size // world_size
    fake = FakeTensorMode()
    model, optimizer, inputs, step, c = detect_parts(exp, setting, fake, world.device, per_rank)
    result = heading("detect", world, "ddp" if world_size > 1 else "none", target, setting.amp, per_rank, per_rank)
    result["caps"] = {
        "image": [c.height, c.width],
        "classes": model.roi_heads.box_predictor.cls_score.out_features - 1,
        "objects_per_image": c.objects,
        "proposals_per_image": c.proposals,
        "rois_per_image": c.rois,
        "mask_rois_per_image": c.positives,
    }
    with fake:
        result.update(measure([model], optimizer, tuple(inputs), step, setting, world))
    if per_rank == 1:
        divisor = model.transform.size_divisible
        square = padded(c.long, divisor) ** 2 / (c.height * c.width)
        result["activations_per_image"] = round(result["memory"]["activations"] * square)
    return result
