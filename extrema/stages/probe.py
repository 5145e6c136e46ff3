"""Linear probe: BatchNorm (no affine) + Linear on the frozen encoder's instance representation (paper Table 3).

    python -m extrema.entry <run-dir> probe     # reads <run-dir>/probe/spec.json

Reads top to bottom: labelled splits, frozen encoder (the run's pretrain checkpoint, probe.checkpoint, or a
random init for the baseline; strictly loaded), head + LARS, resume, loop (cosine lr -> frozen features in
`accum_steps` micro-batches -> head step), top-1/top-5 on the validation split at every epoch end, checkpoints,
result with its protocol. The helpers for splits, seeded training samples and evaluation serve `finetune` too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Subset

from extrema import data, interop
from extrema.dist import Preemption, World, init_world
from extrema.knn import topk_accuracy
from extrema.models.classifier import LinearProbe
from extrema.models.vit import VisionTransformer, build_vit
from extrema.optim import LARS, cosine_schedule, param_groups, scaled_lr, set_hyperparams
from extrema.spec import Experiment, FinetuneSpec, ProbeSpec, RunSpec
from extrema.stages.step_end import StepEnd, outcome

DownstreamSpec = ProbeSpec | FinetuneSpec
SPLIT_SEED = 0  # held-out splits and subsets depend on the dataset only, so every stage and run sees the same


# ------------------------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class Splits:
    """Training and validation images: datasets plus the indices used from each."""

    train: data.LabeledImages
    train_idx: list[int]
    val: data.LabeledImages
    val_idx: list[int]
    num_classes: int
    val_source: str


def holdout_split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train, val) indices of a seeded split holding out ceil(fraction * n) items, each in increasing order."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(data.seed_of(SPLIT_SEED, n)))
    k = min(n - 1, max(1, math.ceil(fraction * n)))
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


def labelled_splits(exp: Experiment, s: DownstreamSpec) -> Splits:
    """The train split (or its seeded remainder) and the val split (or a seeded held-out part of train)."""
    train = data.build_dataset(exp.data, "train", seed=exp.pretrain.seed)
    if s.val_fraction is not None:
        train_idx, val_idx = holdout_split(len(train), s.val_fraction)
        val, source = train, f"train holdout {s.val_fraction:g}"
    else:
        val = data.build_dataset(exp.data, "val", seed=exp.pretrain.seed)
        train_idx, val_idx, source = list(range(len(train))), list(range(len(val))), "val"
    train_idx = [train_idx[i] for i in data.subset_indices(len(train_idx), s.train_size, SPLIT_SEED)]
    val_idx = [val_idx[i] for i in data.subset_indices(len(val_idx), s.val_size, SPLIT_SEED)]
    return Splits(train, train_idx, val, val_idx, len(train.classes), source)


class SeededSamples(Dataset[tuple[Tensor, int]]):
    """Transformed (image, label) of item (epoch, i); its randomness derives from (seed, epoch, i) only."""

    def __init__(self, base: data.LabeledImages, indices: list[int], transform: Callable[[Tensor], Tensor], seed: int):
        self.base, self.indices, self.transform, self.seed = base, indices, transform, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        epoch, i = key
        img, label = self.base[self.indices[i]]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(data.seed_of(self.seed, epoch, i))
            return self.transform(img), label


def train_loader(
    samples: SeededSamples, batch_size: int, seed: int, start_step: int, total_steps: int, world: World, workers: int
) -> DataLoader:
    """This rank's share of every global batch from start_step on, in step order (resumes exactly)."""
    sampler = data.StepBatchSampler(len(samples), batch_size, seed, start_step, total_steps, world.rank, world.size)
    return data.step_loader(samples, sampler, workers)


def crop_pct(img_size: int) -> float:
    """Evaluation centre-crop fraction: 0.875 at ImageNet sizes, none for small images (as the kNN stage)."""
    return 1.0 if img_size <= 64 else 0.875


def val_loader(splits: Splits, img_size: int, batch_size: int, world: World, workers: int) -> DataLoader:
    """This rank's contiguous slice of the validation images, resized and centre-cropped."""
    per_rank = -(-len(splits.val_idx) // world.size)
    mine = splits.val_idx[world.rank * per_rank : (world.rank + 1) * per_rank]
    transformed = data.Transformed(splits.val, data.eval_transform(img_size, crop_pct(img_size)))
    return data.ordered_loader(Subset(transformed, mine), batch_size, workers)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on GPU (and on CPU when asked), None for fp32."""
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None


@torch.no_grad()
def evaluate(
    predict: Callable[[Tensor], Tensor], loader: DataLoader, world: World, amp: torch.dtype | None
) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) over every rank's slice, each image counted once."""
    counts = torch.zeros(3, dtype=torch.float64)
    for x, y in loader:
        with torch.autocast(world.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            logits = predict(x.to(world.device, non_blocking=True))
        acc = topk_accuracy(logits.float().cpu(), y)
        counts += torch.tensor([round(acc[1] * len(y) / 100), round(acc[5] * len(y) / 100), len(y)])
    if dist.is_initialized():
        counts = counts.to(world.device)
        dist.all_reduce(counts)
    top1, top5, n = counts.tolist()
    return {"top1": 100.0 * top1 / max(n, 1), "top5": 100.0 * top5 / max(n, 1)}


def step_counts(num_train: int, batch_size: int, epochs: float, warmup_epochs: float) -> tuple[int, int, float]:
    """(steps per epoch (drop_last), total steps, warmup steps)."""
    if num_train < batch_size:
        raise ValueError(f"{num_train} training images are fewer than the batch size {batch_size}")
    per_epoch = num_train // batch_size
    return per_epoch, max(1, math.ceil(epochs * per_epoch)), warmup_epochs * per_epoch


def protocol(exp: Experiment, s: DownstreamSpec, splits: Splits, world: World, **derived: Any) -> dict[str, Any]:
    """Every setting that changes the number: the stage spec plus the model, data and derived quantities."""
    settings = s.model_dump(mode="json", exclude={"eval_batch_size", "ckpt_every"})
    return {
        **settings,
        "arch": exp.model.arch,
        "cls_token": exp.model.cls_token,
        "dataset": exp.data.dataset,
        "train_images": len(splits.train_idx),
        "val_images": len(splits.val_idx),
        "val_source": splits.val_source,
        "world_size": world.size,
        "effective_batch": s.batch_size,
        "per_rank_batch": s.batch_size // world.size,
        **derived,
    }


# ------------------------------------------------------------------------------------------------- the probe


def probe_features(encoder: VisionTransformer, x: Tensor, p: ProbeSpec) -> Tensor:
    """The probed feature (B, D): the instance representation or the patch mean, before or after the final norm."""
    instance, patches = encoder.forward_features(x)
    feature = instance if p.feature == "instance" else patches.mean(dim=1)
    return encoder.norm(feature) if p.final_norm else feature


def frozen_encoder(exp: Experiment, p: ProbeSpec, source: str | None) -> VisionTransformer:
    """The encoder to probe, without drop path, strictly loaded from `source` (seeded random init when None)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        encoder = build_vit(exp.model, drop_path_rate=0.0)
    if source is not None:
        weights = interop.encoder_weights(source, p.encoder)
        interop.use_pos_embed(encoder, weights.pop("pos_embed", None), learnable=False)
        interop.load_strict(encoder, weights, source)
    return encoder.requires_grad_(False).eval()


def run(spec: RunSpec, stage_dir: str) -> dict[str, Any]:
    """Train a linear probe on frozen features, evaluating each epoch; return last/best accuracy and the protocol."""
    exp, p = spec.experiment, spec.experiment.probe
    world = init_world()
    amp = autocast_dtype(p.precision, world.device)
    img_size = exp.model.resolved_img_size

    splits = labelled_splits(exp, p)
    steps_per_epoch, total_steps, warmup_steps = step_counts(
        len(splits.train_idx), p.batch_size, p.epochs, p.warmup_epochs
    )
    peak_lr = scaled_lr(p.base_lr, p.batch_size)

    source = None if p.init == "random" else interop.weights_source(p.checkpoint, stage_dir)
    encoder = frozen_encoder(exp, p, source).to(world.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        head = LinearProbe(encoder.embed_dim, splits.num_classes)
    if world.size > 1 and world.device.type == "cuda":  # SyncBatchNorm runs on GPUs only
        head = nn.SyncBatchNorm.convert_sync_batchnorm(head)
    head = head.to(world.device)
    trained: nn.Module = head
    if world.size > 1:
        trained = DistributedDataParallel(
            head, device_ids=[world.device.index] if world.device.type == "cuda" else None
        )
    groups = param_groups(head, p.weight_decay, no_decay_names=())
    optimizer: torch.optim.Optimizer
    if p.optimizer == "lars":
        optimizer = LARS(groups, lr=peak_lr, weight_decay=p.weight_decay, momentum=p.momentum)
    else:
        optimizer = torch.optim.SGD(groups, lr=peak_lr, momentum=p.momentum)

    vals = val_loader(splits, img_size, p.eval_batch_size, world, exp.data.num_workers)

    def predict(x: Tensor) -> Tensor:
        return head(probe_features(encoder, x, p).float())

    step_end = StepEnd.resume(
        world,
        stage_dir,
        steps_per_epoch,
        total_steps,
        p.ckpt_every,
        head,
        optimizer,
        lambda: evaluate(predict, vals, world, amp),
    )
    start_step, extra = step_end.start_step, step_end.extra
    samples = SeededSamples(splits.train, splits.train_idx, data.classify_transform(img_size), p.seed)
    loader = train_loader(samples, p.batch_size, p.seed, start_step, total_steps, world, exp.data.num_workers)

    head.train()
    running = torch.zeros((), device=world.device)
    with Preemption() as preemption:
        for step, (x, y) in enumerate(loader, start=start_step):
            lr = cosine_schedule(step, total_steps, peak_lr, p.min_lr, warmup_steps)
            set_hyperparams(optimizer, lr)
            x, y = x.to(world.device, non_blocking=True), y.to(world.device, non_blocking=True)
            with (
                torch.no_grad(),
                torch.autocast(world.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None),
            ):
                feats = torch.cat([probe_features(encoder, chunk, p) for chunk in x.chunk(p.accum_steps)])
            loss = F.cross_entropy(trained(feats.float()), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            running += loss.detach()
            step_end(step + 1, lr, running, preemption)

    return {
        **outcome("probe", extra),
        "steps": int(extra["step"]),
        "epochs": int(extra["step"]) / steps_per_epoch,
        "checkpoint": source,
        "protocol": protocol(exp, p, splits, world, lr=peak_lr, steps=total_steps, img_size=img_size),
    }
