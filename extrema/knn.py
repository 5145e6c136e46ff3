"""Weighted k-nearest-neighbour classification on L2-normalised features (the DINO protocol). Pure functions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from extrema.models.vit import VisionTransformer

Feature = Literal["instance", "instance_prenorm", "patch_mean"]


def knn_predict(
    bank: Tensor,
    bank_labels: Tensor,
    queries: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> Tensor:
    """Class scores (Q, num_classes): each of the k nearest bank rows votes exp(cos / T) for its label."""
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    out = []
    for start in range(0, queries.shape[0], chunk):
        sim = queries[start : start + chunk] @ bank.t()
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device)
        votes.scatter_add_(1, bank_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out)


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Percentage of rows whose label is among the k highest scores, for each k."""
    ranked = scores.argsort(dim=1, descending=True)
    hits = ranked == labels.view(-1, 1)
    return {k: 100.0 * hits[:, : min(k, scores.shape[1])].any(dim=1).float().mean().item() for k in ks}


def knn_accuracy(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, labels: Tensor, num_classes: int, k: int, temperature: float
) -> dict[str, float]:
    """Top-1 and top-5 kNN accuracy (percent) of queries against a labelled bank."""
    scores = knn_predict(bank, bank_labels, queries, num_classes, k, temperature)
    acc = topk_accuracy(scores, labels)
    return {"top1": acc[1], "top5": acc[5]}


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
