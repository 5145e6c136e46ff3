"""Weighted k-nearest-neighbour classification on L2-normalised features (the DINO protocol). Pure functions."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor


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


def topk_hits(scores: Tensor, labels: Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, Tensor]:
    """Number of rows whose label is among the k highest scores, for each k, as 0-d tensors (no host sync)."""
    ranked = scores.argsort(dim=1, descending=True)
    hits = ranked == labels.view(-1, 1).to(ranked.device)
    return {k: hits[:, : min(k, scores.shape[1])].any(dim=1).sum() for k in ks}


def topk_accuracy(scores: Tensor, labels: Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Percentage of rows whose label is among the k highest scores, for each k."""
    return {k: 100.0 * h.item() / max(scores.shape[0], 1) for k, h in topk_hits(scores, labels, ks).items()}


def knn_hits(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, labels: Tensor, num_classes: int, k: int, temperature: float
) -> Tensor:
    """(top-1 hits, top-5 hits, queries) of a slice of queries against the whole bank, as a float64 tensor on the
    bank's device: slices of one query set add up to the whole set's counts."""
    scores = knn_predict(bank, bank_labels.to(bank.device), queries.to(bank.device), num_classes, k, temperature)
    hits = topk_hits(scores, labels)
    n = torch.tensor(float(queries.shape[0]), dtype=torch.float64, device=bank.device)
    return torch.stack([hits[1].double(), hits[5].double(), n])


def accuracy_of(hits: Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) from `knn_hits` counts (summed over slices)."""
    top1, top5, n = hits.tolist()
    return {"top1": 100.0 * top1 / max(n, 1.0), "top5": 100.0 * top5 / max(n, 1.0)}


def knn_accuracy(
    bank: Tensor, bank_labels: Tensor, queries: Tensor, labels: Tensor, num_classes: int, k: int, temperature: float
) -> dict[str, float]:
    """Top-1 and top-5 kNN accuracy (percent) of queries against a labelled bank."""
    return accuracy_of(knn_hits(bank, bank_labels, queries, labels, num_classes, k, temperature))
