"""Sample orders over tar shards: the per-sample global shuffle, or a shard-local order that reads blocks.

The shard-local order (`blocks`) cuts every shard into blocks of at most `block` consecutive samples, shuffles the
blocks, and shuffles the samples within each window of `window` consecutive blocks of that sequence (MosaicML
streaming's py1e idea, at block granularity). An epoch thus visits every block once, all of a window's blocks
together, so a reader fetches each block whole, once an epoch. The order is a pure function of (seed, epoch, the
shard layout, block, window): the same at any number of ranks and loader workers, and a resumed run continues it.

A global batch drawn from a window holds samples of at most `window` places in the dataset: the mixing is as good
as the shards are mixed when written (ImageFolder order is sorted by class: a window of 16 blocks holds about
16-32 classes), which is why `global` stays the default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from extrema.data.seeds import seed_of

Order = Literal["global", "blocks"]
DEFAULT_ORDER: Order = "global"
DEFAULT_BLOCK = 256  # samples: ~28 MB of ImageNet JPEGs, one ranged GET
DEFAULT_WINDOW = 16  # blocks shuffled together: 4,096 samples at the default block


@dataclass(frozen=True)
class OrderSettings:
    """Which order a split's training reads follow, and the block and window sizes of the shard-local one."""

    order: Order = DEFAULT_ORDER
    block: int = DEFAULT_BLOCK
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        if self.order not in ("global", "blocks"):
            raise ValueError(f"order {self.order!r} is not 'global' or 'blocks'")
        if self.block < 1 or self.window < 1:
            raise ValueError(f"block ({self.block}) and window ({self.window}) must be at least 1")


def order_settings(spec: Any) -> OrderSettings:
    """The order settings of a DataSpec (`data.order`, `data.order_block`, `data.order_window`; defaults while the
    spec lacks them)."""
    return OrderSettings(
        getattr(spec, "order", None) or DEFAULT_ORDER,
        getattr(spec, "order_block", None) or DEFAULT_BLOCK,
        getattr(spec, "order_window", None) or DEFAULT_WINDOW,
    )


def global_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The per-sample shuffle of epoch `epoch`: a permutation of all n items, seeded by (seed, epoch) only."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed_of(seed, epoch)))


def cut_blocks(shard_counts: Sequence[int], block: int) -> tuple[np.ndarray, np.ndarray]:
    """(first sample, sample count) of every block: each shard cut into runs of `block` consecutive samples, its
    last run shorter."""
    starts: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    first = 0
    for count in shard_counts:
        offsets = np.arange(0, count, block, dtype=np.int64)
        starts.append(first + offsets)
        counts.append(np.minimum(block, count - offsets))
        first += count
    return np.concatenate(starts), np.concatenate(counts)


@dataclass(frozen=True)
class BlockOrder:
    """The shard-local order of one split under one seed: blocks shuffled, then samples within windows of blocks."""

    shard_counts: tuple[int, ...]
    seed: int
    block: int = DEFAULT_BLOCK
    window: int = DEFAULT_WINDOW
    starts: np.ndarray = field(init=False, repr=False, compare=False)
    counts: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        starts, counts = cut_blocks(self.shard_counts, self.block)
        object.__setattr__(self, "starts", starts)
        object.__setattr__(self, "counts", counts)

    @property
    def num_samples(self) -> int:
        """Samples in the split."""
        return int(sum(self.shard_counts))

    @property
    def num_windows(self) -> int:
        """Windows in an epoch."""
        return -(-len(self.starts) // self.window)

    def block_of(self, index: int) -> int:
        """The block holding sample `index`."""
        return int(np.searchsorted(self.starts, index, side="right")) - 1

    def block_sequence(self, epoch: int) -> np.ndarray:
        """Block ids in the order epoch `epoch` visits them."""
        g = torch.Generator().manual_seed(seed_of(self.seed, epoch, 0))
        return torch.randperm(len(self.starts), generator=g).numpy()

    def window_blocks(self, epoch: int, k: int) -> np.ndarray:
        """The block ids of window k of epoch `epoch`, in visiting order."""
        return self.block_sequence(epoch)[k * self.window : (k + 1) * self.window]

    def permutation(self, epoch: int) -> Tensor:
        """The order of epoch `epoch`: a permutation of all samples, seeded by (seed, epoch) only."""
        sequence = self.block_sequence(epoch)
        pieces = []
        for k in range(0, len(sequence), self.window):
            ids = sequence[k : k + self.window]
            samples = np.concatenate([np.arange(self.starts[b], self.starts[b] + self.counts[b]) for b in ids])
            g = torch.Generator().manual_seed(seed_of(self.seed, epoch, 1, k // self.window))
            pieces.append(torch.from_numpy(samples)[torch.randperm(len(samples), generator=g)])
        return torch.cat(pieces)
