"""Detection transfer: Mask R-CNN with the pretrained ViT as backbone, COCO box and mask AP (paper Table 1).

    python -m extrema.entry <run-dir> detect     # reads <run-dir>/detect/spec.json

Reads top to bottom: COCO-format train/val sets (the URLs of detect.*, or the Fashion-MNIST canvas set built on
first use), torchvision Mask R-CNN on the ViT pyramid + FPN (no class token, sin-cos positions for each grid)
whose ViT is strictly loaded from the run's pretrain checkpoint (or detect.checkpoint, or a random init for the
baseline), AdamW with layer-wise lr decay, resume, loop (step schedule with linear warmup -> multi-scale + flip
samples -> summed Mask R-CNN losses -> step), COCOeval bbox + segm at the end (and every eval_every_epochs),
checkpoints, result with its protocol.

Recipe (CAE, ViT-B): AdamW lr 3e-4, wd 0.05, layer decay 0.75, drop path 0.2, batch 32, 12 epochs with 10x lr
drops after epochs 9 and 11, 500 warmup steps. Differences from it: torchvision's smooth-L1 box regression
(CAE uses a GIoU loss) and BatchNorm in the heads (SyncBatchNorm across GPUs); no relative position bias and
no layer scale in the blocks (ExtreMA's own blocks have none).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torchvision.models.detection import MaskRCNN

from extrema.data import datasets, loaders
from extrema.data.detection import (
    CocoDetection,
    EvalImages,
    SeededDetection,
    canvas_sets,
    collate,
    model_target,
    train_transform,
)
from extrema.eval import coco_eval
from extrema.eval.supervised import SPLIT_SEED, step_counts
from extrema.models.detector import DISCARDED_KEYS, STRIDES, build_detector, feature_blocks
from extrema.run import rundir
from extrema.run.attempt import BARE, Attempt
from extrema.spec import DetectSpec, Experiment, RunSpec
from extrema.train import weights
from extrema.train.dist import Preemption, World, after_main, autocast_dtype, data_parallel, init_world
from extrema.train.optim import build_adamw, param_groups, set_hyperparams
from extrema.train.step_end import Cadence, LoopState, StepEnd

REFERENCE_EPOCHS = 12  # the 1x schedule the lr steps are given in
LOSSES = ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask")
RESULT_KEYS = tuple(f"{kind}_{m}" for kind in ("box", "mask") for m in coco_eval.METRICS)


def step_lr(step: int, steps_per_epoch: int, d: DetectSpec) -> float:
    """The 1x schedule at an optimizer step: linear warmup from warmup_ratio * lr, 10x drops at the scaled steps."""
    epoch = step / steps_per_epoch
    drops = sum(epoch >= s * d.epochs / REFERENCE_EPOCHS for s in d.lr_steps)
    lr = d.lr * 0.1**drops
    if step < d.warmup_steps:
        lr *= d.warmup_ratio + (1 - d.warmup_ratio) * step / d.warmup_steps
    return lr


def detect_optimizer(model: MaskRCNN, d: DetectSpec) -> torch.optim.AdamW:
    """AdamW with layer-wise lr decay over the detector's ViT blocks, at the stage's peak lr."""
    depth = model.backbone.body.encoder.depth
    groups = param_groups(model, d.weight_decay, layer_decay=d.layer_decay, num_layers=depth)
    return build_adamw(groups, lr=d.lr, betas=d.betas)


def detection_sets(exp: Experiment, d: DetectSpec, stage_dir: str, world: World) -> tuple[CocoDetection, CocoDetection]:
    """(train, val) detection sets: COCO files at the spec's URLs, or the canvas set (built once, by rank 0)."""
    if d.dataset == "coco":
        # Experiment validation refuses a 'coco' detect stage without its four URLs.
        assert d.train_annotations and d.train_images and d.val_annotations and d.val_images
        train = (d.train_annotations, d.train_images)
        val = (d.val_annotations, d.val_images)
    else:
        directory = d.canvas_dir or rundir.join(stage_dir, "canvas")
        if world.is_main:
            canvas_sets(exp.data, d, directory)
        after_main("canvas")
        sets = canvas_sets(exp.data, d, directory)
        train, val = sets["train"], sets["val"]
    return CocoDetection(*train, drop_empty=True), CocoDetection(*val)


def build_model(
    exp: Experiment, d: DetectSpec, num_classes: int, source: str | None, amp: torch.dtype | None
) -> MaskRCNN:
    """Mask R-CNN whose ViT is strictly loaded from `source` (seeded random init when None)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(d.seed)
        model = build_detector(exp.model, d, num_classes, amp)
    if source is not None:
        encoder = model.backbone.body.encoder
        weights.load_encoder(encoder, source, d.encoder, discard=DISCARDED_KEYS)
    return model


@torch.no_grad()
def evaluate(
    model: MaskRCNN, val: CocoDetection, val_idx: list[int], d: DetectSpec, world: World, workers: int
) -> dict[str, float]:
    """COCO box and mask AP of the model on the validation images (each rank runs a slice, rank 0 scores)."""
    per_rank = -(-len(val_idx) // world.size)
    mine = val_idx[world.rank * per_rank : (world.rank + 1) * per_rank]
    loader = loaders.ordered_loader(EvalImages(val, mine), d.eval_batch_size, workers, collate)
    was_training = model.training
    model.eval()
    boxes: list[dict[str, Any]] = []
    masks: list[dict[str, Any]] = []
    for images, ids in loader:
        outputs = model([img.to(world.device, non_blocking=True) for img in images])
        for output, image_id in zip(outputs, ids):
            b, m = coco_eval.to_results(output, image_id, val.category_ids)
            boxes += b
            masks += m
    model.train(was_training)
    if dist.is_initialized():
        gathered: list[Any] | None = [None] * world.size if world.is_main else None
        dist.gather_object((boxes, masks), gathered, dst=0)
        if gathered is not None:
            boxes = [r for part in gathered for r in part[0]]
            masks = [r for part in gathered for r in part[1]]
    scores = [coco_eval.evaluate(val.coco, boxes, masks, [val.ids[i] for i in val_idx]) if world.is_main else {}]
    if dist.is_initialized():
        after_main("coco-eval")
        dist.broadcast_object_list(scores, src=0)
    return scores[0]


def protocol(exp: Experiment, d: DetectSpec, world: World, **derived: Any) -> dict[str, Any]:
    """Every setting that changes the numbers: the stage spec plus the model, data and derived quantities."""
    settings = d.model_dump(
        mode="json", exclude={"eval_batch_size", "ckpt_every", "keep_last", "keep_every", "canvas_dir"}
    )
    return {
        **settings,
        "arch": exp.model.arch,
        "cls_token": exp.model.cls_token,
        "patch_size": exp.model.resolved_patch_size,
        "feature_blocks": list(feature_blocks(exp.model.dims[1], exp.model.resolved_patch_size)),
        "strides": list(STRIDES),
        "world_size": world.size,
        "per_rank_batch": d.batch_size // world.size,
        **derived,
    }


def run(spec: RunSpec, stage_dir: str, attempt: Attempt = BARE) -> dict[str, Any]:
    """Fine-tune Mask R-CNN on the ViT and return COCO box and mask AP with the protocol. `attempt` (the job entry's)
    fences the checkpoints and receives the metrics."""
    exp, d = spec.experiment, spec.experiment.detect
    world = init_world()
    amp = autocast_dtype(d.precision, world.device)
    if d.batch_size % world.size:
        raise ValueError(f"detect.batch_size {d.batch_size} is not divisible by the world size {world.size}")
    workers = exp.data.num_workers

    train, val = detection_sets(exp, d, stage_dir, world)
    train_idx = loaders.subset_indices(len(train), d.train_size, SPLIT_SEED)
    val_idx = loaders.subset_indices(len(val), d.val_size, SPLIT_SEED)
    steps_per_epoch, total_steps, _ = step_counts(len(train_idx), d.batch_size, d.epochs)
    eval_every = max(1, round(d.eval_every_epochs * steps_per_epoch)) if d.eval_every_epochs else None

    source = None if d.init == "random" else weights.weights_source(d.checkpoint, stage_dir)
    model = build_model(exp, d, len(train.classes), source, amp)
    model, trained = data_parallel(model, world)
    optimizer = detect_optimizer(model, d)

    step_end = StepEnd(
        world=world,
        stage_dir=stage_dir,
        module=model,
        optimizer=optimizer,
        loop=LoopState(LOSSES, RESULT_KEYS),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        cadence=Cadence(
            log_every=d.log_every,
            eval_every=eval_every or total_steps,
            ckpt_every=d.ckpt_every,
            keep_last=d.keep_last,
            keep_every=d.keep_every,
        ),
        evaluate=lambda: evaluate(model, val, val_idx, d, world, workers),
        on_nonfinite=d.on_nonfinite,
        max_skipped_steps=d.max_skipped_steps,
        attempt=attempt,
    )
    start_step = step_end.resume()

    transform = train_transform(d.train_scales, d.max_size, d.crop_scales, d.crop_size)
    samples = SeededDetection(train, train_idx, transform, d.seed)
    loader = loaders.step_batches(samples, d.batch_size, d.seed, start_step, total_steps, world, workers, collate)

    model.train()
    running = torch.zeros(len(LOSSES), device=world.device)
    with Preemption() as preemption:
        for step, (images, targets) in enumerate(loader, start=start_step):
            lr = step_lr(step, steps_per_epoch, d)
            set_hyperparams(optimizer, lr)
            # Drop path and the RPN / RoI samplers draw from the global RNG: seed it per step for exact resumes.
            torch.manual_seed(datasets.seed_of(d.seed, world.rank, step))
            losses = trained(
                [img.to(world.device, non_blocking=True) for img in images],
                [model_target(t, world.device) for t in targets],
            )
            loss = sum(losses[k] for k in LOSSES)
            loss.backward()  # type: ignore[union-attr]
            parts = torch.stack([losses[k].detach() for k in LOSSES])
            if step_end.optimizer_step(step + 1, parts, model.parameters(), d.clip_grad):
                running += parts
            step_end(step + 1, running, preemption, lr=lr)

    return {
        **{f"detect_{k}": step_end.loop.values[k] for k in RESULT_KEYS},
        **step_end.progress(),
        "checkpoint": source,
        "protocol": protocol(
            exp,
            d,
            world,
            lr_schedule_steps=[math.ceil(s * d.epochs / REFERENCE_EPOCHS * steps_per_epoch) for s in d.lr_steps],
            steps=total_steps,
            train_images=len(train_idx),
            val_images=len(val_idx),
            classes=len(train.classes),
        ),
    }
