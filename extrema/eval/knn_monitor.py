"""The kNN monitor: features of an encoder on this rank's slice of a split, scored against a bank.

Serves the pretrain stage (monitor), the knn stage (evaluation of a checkpoint) and inpaint (its images).

Shared across ranks and bounded: each rank decodes and embeds only its slice of the bank and of the queries; the
bank's features are gathered on every rank's device, each rank searches its own queries there in chunks, and the
hit counts are summed over ranks. Host memory per rank is its slice of the uint8 images (cached for the run:
bank/world + val/world images) plus one batch; device memory is the bank's features (bank x dim x 4 bytes) plus a
chunk of similarities. The raw-pixel baseline takes the same path with pixels, average-pooled to at most
PIXEL_SIDE pixels a side (3 x 32 x 32 = 3,072 values per image), so its bank is bounded at any resolution.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import cache
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from extrema.data import datasets, loaders, transforms
from extrema.data.augment import normalize
from extrema.eval.neighbors import accuracy_of, knn_hits
from extrema.models.vit import VisionTransformer
from extrema.spec import DataSpec, Experiment
from extrema.train.dist import World, all_gather_rows

Feature = Literal["instance", "instance_prenorm", "patch_mean"]


@cache
def _dataset(spec: DataSpec, split: str, seed: int) -> datasets.LabeledImages:
    return datasets.build_dataset(spec, split, seed=seed)  # type: ignore[arg-type]


@cache
def eval_images(
    spec: DataSpec, img_size: int, split: str, limit: int | None, seed: int, rank: int, world_size: int
) -> tuple[Tensor, Tensor]:
    """This rank's slice of an evaluation split, resized and centre-cropped once per process (uint8)."""
    ds = _dataset(spec, split, seed)
    geometry = transforms.eval_geometry(img_size, transforms.eval_crop_pct(img_size))
    return loaders.eval_images(ds, geometry, spec.num_workers, limit, 0, rank, world_size)


def eval_batches(exp: Experiment, split: str, limit: int | None, world: World) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalised (images, labels) batches of this rank's slice of a split, on the rank's device."""
    p = exp.pretrain
    images, labels = eval_images(exp.data, exp.model.resolved_img_size, split, limit, p.seed, world.rank, world.size)
    n = exp.knn.batch_size
    for i in range(0, images.shape[0], n):
        x = images[i : i + n].to(world.device, non_blocking=True)
        yield normalize(x.float().div_(255)), labels[i : i + n]


def features(encoder: VisionTransformer, images: Tensor, feature: Feature = "instance") -> Tensor:
    """Representation of a batch: LN(instance), the pre-norm instance, or the mean of the patch tokens."""
    if feature == "instance":
        return encoder(images)
    inst, patches = encoder.forward_features(images)
    return inst if feature == "instance_prenorm" else patches.mean(dim=1)


@torch.no_grad()
def extract(
    encoder: VisionTransformer,
    batches: Iterable[tuple[Tensor, Tensor]],
    feature: Feature,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Features (float32) and labels of every batch, on `device`, with the encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for x, y in batches:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            f = features(encoder, x.to(device, non_blocking=True), feature)
        feats.append(f.float())
        labels.append(y.to(device, non_blocking=True))
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def gather_bank(feats: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's (features, labels) rows, in rank order, on every rank's device."""
    gathered = all_gather_rows(torch.cat([feats, labels.unsqueeze(1).to(feats.dtype)], 1))
    return gathered[:, :-1], gathered[:, -1].long()


def extract_all(
    encoder: VisionTransformer, exp: Experiment, split: str, limit: int | None, world: World, amp: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """Features and labels of a split, each rank extracting its slice, gathered on every rank's device."""
    return gather_bank(*extract(encoder, eval_batches(exp, split, limit, world), exp.knn.feature, world.device, amp))


def num_classes(exp: Experiment) -> int:
    """Number of classes of the training split."""
    return len(_dataset(exp.data, "train", exp.pretrain.seed).classes)


def shared_accuracy(
    bank: Tensor, bank_y: Tensor, queries: Tensor, query_y: Tensor, exp: Experiment
) -> dict[str, float]:
    """kNN accuracy of every rank's queries against the (gathered) bank: each rank searches its own slice on its
    device, and the hit counts are summed over ranks."""
    k = exp.knn
    hits = knn_hits(bank, bank_y, queries, query_y, num_classes(exp), k.k, k.temperature)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(hits)
    return accuracy_of(hits)


@torch.no_grad()
def knn_monitor(
    encoder: VisionTransformer, exp: Experiment, world: World, amp: torch.dtype | None = None
) -> dict[str, float]:
    """Top-1/top-5 weighted kNN accuracy of the encoder: train-split bank, validation-split queries."""
    k = exp.knn
    bank, bank_y = extract_all(encoder, exp, "train", k.bank_size, world, amp)
    queries, query_y = extract(encoder, eval_batches(exp, "val", k.val_size, world), k.feature, world.device, amp)
    return shared_accuracy(bank, bank_y, queries, query_y, exp)


PIXEL_SIDE = 32  # the pixel baseline's images are average-pooled to at most this many pixels a side


def pixels(x: Tensor) -> Tensor:
    """Normalised images (B, 3, H, W) -> flat pixel vectors, average-pooled to at most PIXEL_SIDE a side."""
    if max(x.shape[-2:]) > PIXEL_SIDE:
        x = F.adaptive_avg_pool2d(x, (min(x.shape[-2], PIXEL_SIDE), min(x.shape[-1], PIXEL_SIDE)))
    return x.flatten(1).float()


def pixel_slice(exp: Experiment, split: str, limit: int | None, world: World) -> tuple[Tensor, Tensor]:
    """This rank's slice of a split as pixel vectors and labels, on the rank's device."""
    xs, ys = zip(*[(pixels(x), y.to(world.device)) for x, y in eval_batches(exp, split, limit, world)])
    return torch.cat(xs), torch.cat(ys)


def pixel_knn(exp: Experiment, world: World) -> dict[str, float]:
    """The same kNN protocol on raw normalised pixels: the floor a representation should beat."""
    k = exp.knn
    bank, bank_y = gather_bank(*pixel_slice(exp, "train", k.bank_size, world))
    queries, query_y = pixel_slice(exp, "val", k.val_size, world)
    return shared_accuracy(bank, bank_y, queries, query_y, exp)
