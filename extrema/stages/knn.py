"""kNN evaluation of a pretrained encoder: the pretraining monitor and the standalone `knn` stage.

python -m extrema.entry <run-dir> knn     # evaluates the run's pretrain checkpoint (or knn.checkpoint)
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

import torch

from extrema import ckpt, data, rundir
from extrema.augment import normalize
from extrema.dist import World, all_gather_rows, init_world
from extrema.knn import extract, knn_accuracy
from extrema.models.extrema import ExtreMA
from extrema.models.vit import VisionTransformer
from extrema.spec import DataSpec, Experiment, RunSpec


@cache
def _dataset(spec: DataSpec, split: str, seed: int) -> data.LabeledImages:
    return data.build_dataset(spec, split, seed=seed)  # type: ignore[arg-type]


@cache
def eval_images(
    spec: DataSpec, img_size: int, split: str, limit: int | None, seed: int, rank: int, world_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of an evaluation split, resized and centre-cropped once per process (uint8)."""
    ds = _dataset(spec, split, seed)
    geometry = data.eval_geometry(img_size, 1.0 if img_size <= 64 else 0.875)
    return data.eval_images(ds, geometry, spec.num_workers, limit, 0, rank, world_size)


def eval_batches(
    exp: Experiment, split: str, limit: int | None, world: World
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised (images, labels) batches of this rank's slice of a split, on the rank's device."""
    p = exp.pretrain
    images, labels = eval_images(exp.data, exp.model.resolved_img_size, split, limit, p.seed, world.rank, world.size)
    n = exp.knn.batch_size
    for i in range(0, images.shape[0], n):
        x = images[i : i + n].to(world.device, non_blocking=True)
        yield normalize(x.float().div_(255)), labels[i : i + n]


def extract_all(
    encoder: VisionTransformer, exp: Experiment, split: str, limit: int | None, world: World, amp: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
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

    def flat(split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*[(x.flatten(1).cpu(), y) for x, y in eval_batches(exp, split, limit, single)])
        return torch.cat(xs), torch.cat(ys)

    bank, bank_y = flat("train", k.bank_size)
    val, val_y = flat("val", k.val_size)
    return knn_accuracy(bank, bank_y, val, val_y, num_classes(exp), k.k, k.temperature)


def checkpoint_url(spec: RunSpec, stage_dir: str) -> str:
    """The checkpoint to evaluate: knn.checkpoint, else the newest complete step of the run's pretrain stage."""
    if spec.experiment.knn.checkpoint:
        url = spec.experiment.knn.checkpoint
        if ckpt.latest_step(url) is not None:
            return ckpt.step_url(url, ckpt.latest_step(url))  # type: ignore[arg-type]
        return url
    pretrain_ckpt = rundir.join(stage_dir.rstrip("/").rsplit("/", 1)[0], "pretrain", "ckpt")
    step = ckpt.latest_step(pretrain_ckpt)
    if step is None:
        raise FileNotFoundError(f"no complete pretrain checkpoint under {pretrain_ckpt}")
    return ckpt.step_url(pretrain_ckpt, step)


def run(spec: RunSpec, stage_dir: str) -> dict[str, Any]:
    """Evaluate a pretrain checkpoint with kNN and return top-1/top-5 plus the protocol."""
    exp = spec.experiment
    world = init_world()
    url = checkpoint_url(spec, stage_dir)
    model = ExtreMA(exp.model)
    branch = "target" if exp.knn.encoder == "ema" else "online"
    ckpt.load_module(url, getattr(model, branch).encoder, prefix=f"{branch}.encoder.")
    encoder = getattr(model, branch).encoder.to(world.device)
    acc = knn_monitor(encoder, exp, world, torch.bfloat16 if world.device.type == "cuda" else None)
    return {
        "knn_top1": acc["top1"],
        "knn_top5": acc["top5"],
        "checkpoint": url,
        "protocol": {
            "k": exp.knn.k,
            "temperature": exp.knn.temperature,
            "encoder": exp.knn.encoder,
            "feature": exp.knn.feature,
            "bank_size": exp.knn.bank_size,
            "val_size": exp.knn.val_size,
        },
    }
