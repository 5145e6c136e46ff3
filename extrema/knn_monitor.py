"""The kNN monitor: features of an encoder on this rank's slice of a split, gathered, scored against a bank.

Serves the pretrain stage (monitor), the knn stage (evaluation of a checkpoint) and inpaint (its images).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import cache
from typing import Literal

import torch
from torch import Tensor

from extrema import data
from extrema.augment import normalize
from extrema.dist import World, all_gather_rows
from extrema.models.vit import VisionTransformer
from extrema.neighbors import knn_accuracy
from extrema.spec import DataSpec, Experiment

Feature = Literal["instance", "instance_prenorm", "patch_mean"]


@cache
def _dataset(spec: DataSpec, split: str, seed: int) -> data.LabeledImages:
    return data.build_dataset(spec, split, seed=seed)  # type: ignore[arg-type]


@cache
def eval_images(
    spec: DataSpec, img_size: int, split: str, limit: int | None, seed: int, rank: int, world_size: int
) -> tuple[Tensor, Tensor]:
    """This rank's slice of an evaluation split, resized and centre-cropped once per process (uint8)."""
    ds = _dataset(spec, split, seed)
    geometry = data.eval_geometry(img_size, data.eval_crop_pct(img_size))
    return data.eval_images(ds, geometry, spec.num_workers, limit, 0, rank, world_size)


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
    """Features and labels of every batch, on the CPU, with the encoder in eval mode."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    for x, y in batches:
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            f = features(encoder, x.to(device, non_blocking=True), feature)
        feats.append(f.float().cpu())
        labels.append(y)
    encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def extract_all(
    encoder: VisionTransformer, exp: Experiment, split: str, limit: int | None, world: World, amp: torch.dtype | None
) -> tuple[Tensor, Tensor]:
    """Features and labels of a split, each rank extracting its slice, gathered on every rank."""
    feats, labels = extract(encoder, eval_batches(exp, split, limit, world), exp.knn.feature, world.device, amp)
    gathered = all_gather_rows(torch.cat([feats, labels.unsqueeze(1).float()], 1).to(world.device)).cpu()
    return gathered[:, :-1], gathered[:, -1].long()


def num_classes(exp: Experiment) -> int:
    """Number of classes of the training split."""
    return len(_dataset(exp.data, "train", exp.pretrain.seed).classes)


@torch.no_grad()
def knn_monitor(
    encoder: VisionTransformer, exp: Experiment, world: World, amp: torch.dtype | None = None
) -> dict[str, float]:
    """Top-1/top-5 weighted kNN accuracy of the encoder: train-split bank, validation-split queries."""
    k = exp.knn
    bank, bank_y = extract_all(encoder, exp, "train", k.bank_size, world, amp)
    val, val_y = extract_all(encoder, exp, "val", k.val_size, world, amp)
    return knn_accuracy(bank, bank_y, val, val_y, num_classes(exp), k.k, k.temperature)


def pixel_knn(exp: Experiment, world: World) -> dict[str, float]:
    """The same kNN protocol on raw normalised pixels: the floor a representation should beat."""
    k = exp.knn
    single = World(0, 1, 0, world.device)

    def flat(split: str, limit: int | None) -> tuple[Tensor, Tensor]:
        xs, ys = zip(*[(x.flatten(1).cpu(), y) for x, y in eval_batches(exp, split, limit, single)])
        return torch.cat(xs), torch.cat(ys)

    bank, bank_y = flat("train", k.bank_size)
    val, val_y = flat("val", k.val_size)
    return knn_accuracy(bank, bank_y, val, val_y, num_classes(exp), k.k, k.temperature)
