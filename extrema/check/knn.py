"""The knn stage under fake tensors and a fake process group: memory per rank and FLOPs of its evaluation, as
`extrema.check.downstream` does for a training step.

The stage trains nothing: each rank embeds its slice of the bank's training images and of the validation images
with the frozen encoder (`extract`, one batch at a time, features kept in fp32 on the rank's device), gathers the
whole bank on every rank's device (`gather_bank`) and searches its own queries against it (`knn_hits`: the bank's
normalised copy, then one chunk of queries' similarities to every bank row and their top k at a time). Its peak is
the largest of three moments, each with the encoder's parameters held:

- a forward pass of the queries, with the gathered bank and this rank's queries held (tracked: the encoder at the
  stage's batch on fake storage; the bank and the queries added at their sizes);
- the search (tracked: the stage's own `knn_hits` over fake features of the bank's and the queries' shapes);
- the gather, counted from what `all_gather_rows` allocates (it reads the ranks' sizes on the host, which fake
  tensors cannot).

FLOPs: one forward pass per image of this rank's bank and query slices, and its search. The stage is one step.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensorMode

from extrema.check.downstream import num_classes
from extrema.check.estimate import (
    CudaAutocastFp32,
    FrozenAwareMemTracker,
    Target,
    fake_storage,
    fake_world,
    flop_counter,
    heading,
    local_bytes,
    snapshot_bytes,
)
from extrema.eval.knn_monitor import extract
from extrema.eval.neighbors import knn_hits
from extrema.models.vit import VisionTransformer
from extrema.spec import Experiment
from extrema.stages.knn import knn_autocast, knn_encoder
from extrema.train.dist import World

FP32, INT64 = 4, 8  # bytes of a feature and of a label as the stage keeps them


@dataclass(frozen=True)
class Rows:
    """Images of the stage: the whole bank, this rank's bank and query slices, the longest rank's bank slice."""

    bank: int
    bank_rank: int
    longest: int
    queries_rank: int

    @classmethod
    def of(cls, exp: Experiment, train_images: int, val_images: int, world: World) -> Rows:
        """As `eval_loader` cuts a (seeded subset of a) split into contiguous slices, one per rank."""
        k = exp.knn
        bank, queries = min(k.bank_size or train_images, train_images), min(k.val_size or val_images, val_images)
        return cls(bank, rank_rows(bank, world), -(-bank // world.size), rank_rows(queries, world))


def rank_rows(n: int, world: World) -> int:
    """Rows of this rank's slice of n items, each rank but the last holding ceil(n / ranks)."""
    per_rank = -(-n // world.size)
    return max(0, min(per_rank, n - world.rank * per_rank))


def tracked_peak(held: list[Any], run: Callable[[], object], cuda_autocast: bool) -> tuple[int, int]:
    """The tracker's peak bytes while `run` runs with `held` (modules and tensors) alive beforehand, and its
    FLOPs (call under the fake mode)."""
    tracker = FrozenAwareMemTracker()
    tracker.track_external(*held)
    flops = flop_counter()
    emulate = CudaAutocastFp32() if cuda_autocast else contextlib.nullcontext()
    with tracker, flops, emulate:
        run()
    return snapshot_bytes(tracker, "peak")["Total"], int(flops.get_total_flops())


def gather_peak(rows: Rows, dim: int, world: World) -> int:
    """Bytes `gather_bank` holds at most beside the encoder, with this rank's features and labels alive: their
    concatenation (the labels cast to fp32 for it), over several ranks `all_gather_rows`'s padded copy, one per
    rank and the whole bank, then the bank's labels made int64."""
    row = (dim + 1) * FP32
    mine, joined = rows.bank_rank * (dim * FP32 + INT64), rows.bank_rank * row
    cast, labels = rows.bank_rank * FP32, rows.bank * INT64
    if world.size == 1:
        return mine + joined + max(cast, labels)
    gathering = joined + rows.longest * row * (1 + world.size) + rows.bank * row
    return mine + max(cast + joined, gathering, rows.bank * row + labels)


def fake_bank(rows: Rows, dim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gathered bank's features and labels (as `gather_bank` returns them: views of one fp32 tensor, the
    labels made int64) and this rank's queries' (call under the fake mode)."""
    gathered = torch.zeros(rows.bank, dim + 1)
    queries = torch.zeros(rows.queries_rank, dim)
    return gathered[:, :-1], gathered[:, -1].long(), queries, torch.zeros(rows.queries_rank, dtype=torch.long)


def frozen(exp: Experiment, fake: FakeTensorMode, world: World) -> VisionTransformer:
    """The stage's encoder with fake storage, frozen and in eval mode as the stage holds it."""
    with torch.device("meta"):
        encoder = knn_encoder(exp)
    return fake_storage(encoder.requires_grad_(False).eval(), fake, world.device)


def estimate_knn(
    exp: Experiment,
    nodes: int,
    processes_per_node: int,
    target: Target,
    train_images: int,
    val_images: int,
    rank: int = 0,
) -> dict[str, Any]:
    """Memory of the knn stage per rank (the encoder, the gathered bank, a forward pass's activations, the peak)
    and its FLOPs, at the job's world size. Call in a fresh process: it joins a fake process group as `rank`."""
    world_size = nodes * processes_per_node
    os.environ["LOCAL_WORLD_SIZE"] = str(processes_per_node)
    world = fake_world(world_size, rank)
    amp = knn_autocast(torch.device(target))
    rows = Rows.of(exp, train_images, val_images, world)
    batch = max(1, min(exp.knn.batch_size, max(rows.bank_rank, rows.queries_rank)))
    fake = FakeTensorMode()
    encoder = frozen(exp, fake, world)
    result = heading("knn", world, "gathered bank" if world_size > 1 else "none", target, amp, batch, batch)
    result |= {
        "bank_images": rows.bank,
        "query_images_per_rank": rows.queries_rank,
    }
    with fake:
        result.update(measure(exp, encoder, rows, batch, world, amp, target == "cuda" and amp is not None))
    return result


def measure(
    exp: Experiment,
    encoder: VisionTransformer,
    rows: Rows,
    batch: int,
    world: World,
    amp: torch.dtype | None,
    cuda_autocast: bool,
) -> dict[str, Any]:
    """The stage's forward pass and search under a memory tracker and a FLOP counter (call under the fake mode):
    bytes per rank by kind, the moments' peaks, FLOPs per rank and per step."""
    k = exp.knn
    x = torch.zeros(batch, exp.model.in_chans, exp.model.resolved_img_size, exp.model.resolved_img_size)
    y = torch.zeros(batch, dtype=torch.long)
    out: list[Tensor] = []

    def forward() -> None:
        out.extend(extract(encoder, [(x, y)], k.feature, world.device, amp))

    forward_top, forward_flops = tracked_peak([encoder, x, y], forward, cuda_autocast)
    dim = out[0].shape[1]
    del out[:]
    parameters = local_bytes(encoder.parameters()) + local_bytes(encoder.buffers())
    bank, bank_y, queries, query_y = fake_bank(rows, dim)
    search = functools.partial(knn_hits, bank, bank_y, queries, query_y, num_classes(exp), k.k, k.temperature)
    search_peak, search_flops = tracked_peak([encoder, bank, bank_y, queries, query_y], search, cuda_autocast)
    bank_bytes = rows.bank * ((dim + 1) * FP32 + INT64)
    held = bank_bytes + rows.queries_rank * (dim * FP32 + INT64)
    phases = {
        "forward": forward_top + held,
        "search": search_peak,
        "gather": parameters + gather_peak(rows, dim, world),
    }
    flops = forward_flops * (rows.bank_rank + rows.queries_rank) // batch + search_flops
    return {
        "memory": {
            "parameters": parameters,
            "bank": bank_bytes,
            "activations": forward_top - parameters - local_bytes(iter((x, y))),
            "peak": max(phases.values()),
        },
        "phases": phases,
        "forward_peak": phases["forward"],
        "batch_free_peak": max(phases["search"], phases["gather"]),
        "feature_dim": dim,
        "flops_per_rank": flops,
        "flops_per_step": flops * world.size,
    }
