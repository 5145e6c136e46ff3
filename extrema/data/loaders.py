"""Step-exact loaders: the pretraining step sampler, ordered evaluation loaders, device-decoded batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from extrema.data import augment, decode
from extrema.data.datasets import LabeledImages, seed_of
from extrema.data.shard_order import BlockOrder, global_permutation
from extrema.data.shards import ShardedImages
from extrema.data.transforms import TwoViewTransform
from extrema.data.workers import WorkerStart, worker_context
from extrema.train.dist import World

# ----------------------------------------------------------------------------------------------------- Loading


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    """This rank's share of global batch s for every step s in [start_step, total_steps), as (epoch, index) pairs."""

    def __init__(
        self,
        num_items: int,
        global_batch: int,
        seed: int,
        start_step: int,
        total_steps: int,
        rank: int = 0,
        world_size: int = 1,
        order: Callable[[int], Tensor] | None = None,
    ) -> None:
        if global_batch <= 0 or world_size <= 0 or global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if num_items < global_batch:
            raise ValueError(f"dataset of {num_items} items is smaller than the global batch {global_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if not 0 <= start_step <= total_steps:
            raise ValueError(f"start_step {start_step} must lie in [0, total_steps={total_steps}]")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = num_items // global_batch
        self.order = order

    def permutation(self, epoch: int) -> Tensor:
        """The order of epoch `epoch`: a permutation of all items, seeded by (seed, epoch) only (the per-sample
        shuffle, or the order given)."""
        return global_permutation(self.num_items, self.seed, epoch) if self.order is None else self.order(epoch)

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        local = self.global_batch // self.world_size
        epoch, perm = -1, torch.empty(0, dtype=torch.int64)
        for step in range(self.start_step, self.total_steps):
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                perm = self.permutation(epoch)
            start = (step % self.steps_per_epoch) * self.global_batch + self.rank * local
            yield [(epoch, i) for i in perm[start : start + local].tolist()]


class PretrainViews(Dataset[tuple[Tensor, ...]]):
    """(view1, view2, masks) of item (epoch, index); all its randomness derives from (seed, epoch, index) only.

    With a `device_color` transform the first two items are (uint8 crop, colour parameters) instead. A dataset of
    encoded images decoded on the device gives (encoded bytes, crop geometry, colour parameters, masks).
    """

    def __init__(
        self,
        base: LabeledImages,
        transform: TwoViewTransform,
        seed: int,
        mask_fn: Callable[[torch.Generator], Tensor] | None = None,
    ) -> None:
        self.base, self.transform, self.seed, self.mask_fn = base, transform, seed, mask_fn

    def __len__(self) -> int:
        return len(self.base)

    @property
    def device_decode(self) -> bool:
        """Whether images reach the training process encoded, to be decoded there (data.decode: gpu)."""
        return isinstance(self.base, decode.EncodedImages) and self.base.decoding.device == "gpu"

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, ...]:
        epoch, index = key
        if isinstance(self.base, ShardedImages):  # its reads follow the epoch's order
            encoded: bytes | None = self.base.encoded(index, epoch)[0]
        else:
            encoded = self.base.encoded(index)[0] if isinstance(self.base, decode.EncodedImages) else None
        img = self.base[index][0] if encoded is None else None
        # v2 transforms draw from the global CPU generator: seed it per sample inside a fork that restores the
        # caller's state. Only the CPU generator: torch.manual_seed would also reseed CUDA (and is 100x slower).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed_of(self.seed, epoch, index, 0))
            if encoded is None:
                views: tuple[Tensor, ...] = self.transform(img)  # type: ignore[arg-type]
            elif self.device_decode:
                views = self.transform.deferred(encoded)
            else:
                reduced = self.base.decoding.reduced  # type: ignore[attr-defined]
                views = self.transform.views(self.transform.crop_encoded(encoded, reduced))
        if self.mask_fn is None:
            return (*views, torch.empty(0))
        return (*views, self.mask_fn(torch.Generator().manual_seed(seed_of(self.seed, epoch, index, 1))))


def step_loader(
    dataset: Dataset,
    batch_sampler: StepBatchSampler,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """The training batches of every stage, one per sampler step in step order; workers outlive the epochs."""
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate_fn,
        persistent_workers=num_workers > 0,
        multiprocessing_context=worker_context(num_workers),
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=WorkerStart(),
        # Samples are seeded by (seed, epoch, index); a private generator keeps the loader from drawing
        # its worker base seed from the global RNG, which the training step's drop path consumes.
        generator=torch.Generator().manual_seed(0),
    )


def step_batches(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    start_step: int,
    total_steps: int,
    world: World,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader | DeviceDecodedBatches:
    """This rank's share of every global batch from `start_step` on, in step order: the training input of every
    stage. Items are (epoch, index) keys of a dataset seeded by (seed, epoch, index), so a resumed run sees the
    same samples."""
    n = len(dataset)  # type: ignore[arg-type]
    order = shard_local_order(dataset, batch_size, seed, total_steps)
    sampler = StepBatchSampler(n, batch_size, seed, start_step, total_steps, world.rank, world.size, order)
    if isinstance(dataset, PretrainViews) and dataset.device_decode:
        loader = step_loader(dataset, sampler, num_workers, collate_encoded)
        return DeviceDecodedBatches(loader, dataset.transform, world.device)
    return step_loader(dataset, sampler, num_workers, collate_fn)


def shard_local_order(dataset: Dataset, batch_size: int, seed: int, total_steps: int) -> Callable[[int], Tensor] | None:
    """The epoch orders of pretraining on shards set to `data.order: blocks` (whose reads then follow them), else
    None: the per-sample shuffle."""
    base = dataset.base if isinstance(dataset, PretrainViews) else None
    if not isinstance(base, ShardedImages) or base.order.order != "blocks":
        return None
    order = BlockOrder(base.shard_counts, seed, base.order.block, base.order.window)
    steps_per_epoch = len(base) // batch_size
    base.follow(order, steps_per_epoch * batch_size, max(total_steps - 1, 0) // max(steps_per_epoch, 1))
    return order.permutation


def collate_encoded(items: list[tuple[Tensor, ...]]) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """A batch of encoded items: the images stay a list of byte tensors; geometry, colour and masks are stacked."""
    datas, geometry, color, masks = zip(*items)
    return list(datas), torch.stack(geometry), torch.stack(color), torch.stack(masks)


class DeviceDecodedBatches:
    """Batches decoded and cropped on the training device (batched nvJPEG on CUDA; the CPU without one), handed on
    as the host path hands them: (uint8 crops, colour parameters, masks) with colour on the device, else the views."""

    def __init__(self, loader: DataLoader, transform: TwoViewTransform, device: torch.device) -> None:
        self.loader, self.transform, self.device = loader, transform, device

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        color = self.transform.augmentation == "spatial_consistent_color"
        for datas, geometry, params, masks in self.loader:
            crops = decode.crop_batch(decode.decode_batch(datas, self.device), geometry, self.transform.size)
            if self.transform.device_color:
                yield crops, params.to(self.device, non_blocking=True), masks
            else:
                yield (*augment.two_views(crops, params, color), masks)


def ordered_loader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """The evaluation batches of every stage, in dataset order; its workers too leave stop signals to the stage."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        multiprocessing_context=worker_context(num_workers),
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=WorkerStart(),
        # An evaluation inside training (the kNN monitor) must not draw from the global RNG, which drop path
        # consumes: a resumed run first evaluates at another step than an uninterrupted one.
        generator=torch.Generator().manual_seed(0),
    )


class Transformed(Dataset[tuple[Tensor, int]]):
    """A labelled dataset with a transform applied to each image."""

    def __init__(self, base: LabeledImages, transform: Callable[[Tensor], Tensor]) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        img, target = self.base[i]
        return self.transform(img), target


def subset_indices(n: int, limit: int | None, seed: int) -> list[int]:
    """All indices, or a seeded random subset of `limit` of them in increasing order."""
    if limit is None or limit >= n:
        return list(range(n))
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed_of(seed, n, limit)))[:limit]
    return sorted(chosen.tolist())


def eval_loader(
    base: LabeledImages,
    transform: Callable[[Tensor], Tensor],
    batch_size: int,
    num_workers: int,
    limit: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """(images, labels) batches in a fixed order, of all items or of a seeded subset of `limit` items.

    With world_size > 1 each rank gets a contiguous slice; concatenating the ranks' outputs in rank order
    restores the full order.
    """
    indices = subset_indices(len(base), limit, seed)
    per_rank = -(-len(indices) // world_size)
    data = Subset(Transformed(base, transform), indices[rank * per_rank : (rank + 1) * per_rank])
    return ordered_loader(data, batch_size, num_workers)


def eval_images(
    base: LabeledImages,
    geometry: Callable[[Tensor], Tensor],
    num_workers: int,
    limit: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[Tensor, Tensor]:
    """This rank's slice of a (seeded subset of a) split as one uint8 tensor (N, 3, S, S) plus labels.

    Evaluation is deterministic, so callers can keep the result and reuse it for every evaluation.
    """
    loader = eval_loader(base, geometry, 256, num_workers, limit, seed, rank, world_size)
    xs, ys = zip(*loader) if len(loader.dataset) else ((torch.empty(0, dtype=torch.uint8),), (torch.empty(0),))  # type: ignore[arg-type]
    return torch.cat(xs), torch.cat(ys).long()
