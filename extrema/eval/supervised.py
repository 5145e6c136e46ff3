"""What the supervised stages (probe, finetune, detect) share: labelled splits, seeded training samples, the
validation loader, top-k evaluation, the classifiers' end of step, step counts and the protocol of a result."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from extrema.data import datasets, loaders, transforms
from extrema.eval.neighbors import topk_accuracy
from extrema.run.attempt import Attempt
from extrema.spec import Experiment, FinetuneSpec, ProbeSpec
from extrema.train.dist import World
from extrema.train.step_end import Cadence, Evaluate, LoopState, StepEnd, accuracy_values, keep_accuracy

DownstreamSpec = ProbeSpec | FinetuneSpec
SPLIT_SEED = 0  # held-out splits and subsets depend on the dataset only, so every stage and run sees the same


@dataclass(frozen=True)
class Splits:
    """Training and validation images: datasets plus the indices used from each."""

    train: datasets.LabeledImages
    train_idx: list[int]
    val: datasets.LabeledImages
    val_idx: list[int]
    num_classes: int
    val_source: str


def holdout_split(n: int, fraction: float) -> tuple[list[int], list[int]]:
    """(train, val) indices of a seeded split holding out ceil(fraction * n) items, each in increasing order."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(datasets.seed_of(SPLIT_SEED, n)))
    k = min(n - 1, max(1, math.ceil(fraction * n)))
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


def labelled_splits(exp: Experiment, s: DownstreamSpec) -> Splits:
    """The train split (or its seeded remainder) and the val split (or a seeded held-out part of train)."""
    train = datasets.build_dataset(exp.data, "train", seed=exp.pretrain.seed)
    if s.val_fraction is not None:
        train_idx, val_idx = holdout_split(len(train), s.val_fraction)
        val, source = train, f"train holdout {s.val_fraction:g}"
    else:
        val = datasets.build_dataset(exp.data, "val", seed=exp.pretrain.seed)
        train_idx, val_idx, source = list(range(len(train))), list(range(len(val))), "val"
    train_idx = [train_idx[i] for i in loaders.subset_indices(len(train_idx), s.train_size, SPLIT_SEED)]
    val_idx = [val_idx[i] for i in loaders.subset_indices(len(val_idx), s.val_size, SPLIT_SEED)]
    return Splits(train, train_idx, val, val_idx, len(train.classes), source)


class SeededSamples(Dataset[tuple[Tensor, int]]):
    """Transformed (image, label) of item (epoch, i); its randomness derives from (seed, epoch, i) only."""

    def __init__(
        self, base: datasets.LabeledImages, indices: list[int], transform: Callable[[Tensor], Tensor], seed: int
    ):
        self.base, self.indices, self.transform, self.seed = base, indices, transform, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        epoch, i = key
        img, label = self.base[self.indices[i]]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(datasets.seed_of(self.seed, epoch, i))
            return self.transform(img), label


def val_loader(splits: Splits, img_size: int, batch_size: int, world: World, workers: int) -> DataLoader:
    """This rank's contiguous slice of the validation images, resized and centre-cropped."""
    per_rank = -(-len(splits.val_idx) // world.size)
    mine = splits.val_idx[world.rank * per_rank : (world.rank + 1) * per_rank]
    transformed = loaders.Transformed(
        splits.val, transforms.eval_transform(img_size, transforms.eval_crop_pct(img_size))
    )
    return loaders.ordered_loader(Subset(transformed, mine), batch_size, workers)


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


def step_counts(num_train: int, batch_size: int, epochs: float, warmup_epochs: float = 0.0) -> tuple[int, int, float]:
    """(steps per epoch (drop_last), total steps, warmup steps)."""
    if num_train < batch_size:
        raise ValueError(f"{num_train} training images are fewer than the batch size {batch_size}")
    per_epoch = num_train // batch_size
    return per_epoch, max(1, math.ceil(epochs * per_epoch)), warmup_epochs * per_epoch


def protocol(exp: Experiment, s: DownstreamSpec, splits: Splits, world: World, **derived: Any) -> dict[str, Any]:
    """Every setting that changes the number: the stage spec plus the model, data and derived quantities."""
    settings = s.model_dump(mode="json", exclude={"eval_batch_size", "ckpt_every", "keep_last", "keep_every"})
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


def classifier_step_end(
    world: World,
    stage_dir: str,
    s: DownstreamSpec,
    module: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: tuple[int, int],
    evaluate: Evaluate,
    attempt: Attempt,
) -> StepEnd:
    """The end of step of a classifier stage: evaluate, log and save at every epoch end, keep the best accuracy.
    `steps`: (steps per epoch, total steps); `attempt`: the job entry's (fence and trackers)."""
    return StepEnd(
        world=world,
        stage_dir=stage_dir,
        module=module,
        optimizer=optimizer,
        loop=LoopState(values=accuracy_values()),
        steps_per_epoch=steps[0],
        total_steps=steps[1],
        cadence=Cadence(ckpt_every=s.ckpt_every, keep_last=s.keep_last, keep_every=s.keep_every),
        evaluate=evaluate,
        record=keep_accuracy,
        attempt=attempt,
        on_nonfinite=s.on_nonfinite,
        max_skipped_steps=s.max_skipped_steps,
    )
