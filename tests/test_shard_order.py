"""The shard-local order and block reads: the order is a pure permutation that visits blocks in windows; the block
cache stays in its bound and leaves no file; on a real S3 server (moto over HTTP) a split is read in a few ranged
GETs, the same bits at 1 and 2 ranks and 0 and 2 loader workers from any step, a damaged shard in the cache or the
store is named and fetched again or refused, and pretraining killed with -9 resumes to the same bits."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from extrema import entry
from extrema.data import decode, loaders, shard_order, transforms
from extrema.data.shard_cache import BlockCache, CacheBoundError
from extrema.data.shard_format import ShardIndexError
from extrema.data.shard_order import BlockOrder, OrderSettings, cut_blocks
from extrema.data.shards import ShardedImages
from extrema.spec import StorageSpec
from tests.s3server import KEY, SECRET, S3Server, isolated_aws_env, s3_server  # noqa: F401  (fixture)
from tests.stage_runs import make_run
from tests.test_shards import kill_mid_run_then_resume_equals, last_losses, shard, write_jpeg_folder

BLOCKS = OrderSettings("blocks", block=4, window=2)
SPLIT = "s3://order/in/train"


def test_blocks_are_runs_of_one_shard() -> None:
    starts, counts = cut_blocks([10, 3, 8], 4)
    assert starts.tolist() == [0, 4, 8, 10, 13, 17] and counts.tolist() == [4, 4, 2, 3, 4, 4]


def test_block_order_is_a_pure_permutation_visiting_windows_of_blocks() -> None:
    order = BlockOrder((10, 3, 8, 11), seed=3, block=4, window=2)
    perm = order.permutation(0)
    assert sorted(perm.tolist()) == list(range(32))
    assert torch.equal(perm, BlockOrder((10, 3, 8, 11), seed=3, block=4, window=2).permutation(0))
    assert not torch.equal(perm, order.permutation(1)) and not torch.equal(
        perm, BlockOrder((10, 3, 8, 11), 4).permutation(0)
    )
    first = 0
    for k in range(order.num_windows):  # window k's samples are exactly its blocks', shuffled together
        blocks = order.window_blocks(0, k)
        members = {i for b in blocks for i in range(order.starts[b], order.starts[b] + order.counts[b])}
        assert set(perm[first : first + len(members)].tolist()) == members
        first += len(members)
    assert [order.block_of(i) for i in (0, 3, 4, 10, 31)] == [0, 0, 1, 3, 8]


def test_the_order_is_read_from_the_spec_with_defaults() -> None:
    from extrema.spec import DataSpec

    assert shard_order.order_settings(DataSpec(dataset="shards", root="s3://b/x")) == OrderSettings("global", 256, 16)
    with pytest.raises(ValueError, match="not 'global' or 'blocks'"):
        OrderSettings("random")  # type: ignore[arg-type]


def test_block_cache_stays_in_its_bound_evicts_in_order_and_leaves_no_file(tmp_path: Path) -> None:
    fetched: list[int] = []

    def fetch(block: int) -> bytes:
        fetched.append(block)
        if block == 9:
            raise OSError("store down")
        return bytes([block]) * 100

    cache = BlockCache(lambda b: 100, fetch, 250, str(tmp_path))
    for block in (0, 1, 2, 0):
        assert cache.read(block, 10, 12) == bytes([block]) * 2
        assert cache.held <= 250 and not list(tmp_path.iterdir())  # unlinked files: nothing to leave behind
    assert fetched == [0, 1, 2, 0]  # 0 went first (in order), so it was fetched again
    assert cache.stats.peak_bytes <= 250 and cache.stats.requests == 4 and cache.stats.bytes_fetched == 400
    cache.prefetch([5, 6, 7], keep={0, 2})  # nothing held may go: only what fits is fetched
    with pytest.raises(OSError, match="store down"):
        cache.read(9, 0, 1)
    assert 9 not in cache._entries  # a failed fetch is forgotten
    with pytest.raises(CacheBoundError, match="does not fit"):
        BlockCache(lambda b: 300, fetch, 250, None).read(0, 0, 1)
    cache.close()
    assert cache.held == 0


# ------------------------------------------------------------------------------------------ on an S3 server


@pytest.fixture(scope="module")
def shards(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[S3Server, Path]]:  # noqa: F811
    """48 small JPEGs as 3 shards of 16 on s3://order/in (and file://), written by the command."""
    root = tmp_path_factory.mktemp("order")
    write_jpeg_folder(root / "folder", {"train": 16, "val": 2})
    s3_server.make_bucket("order")
    with pytest.MonkeyPatch.context() as mp:
        isolated_aws_env(mp, root)
        shard(str(root / "folder"), "s3://order/in", "--endpoint-url", s3_server.endpoint, "--shard-size", "40KB")
        shard(str(root / "folder"), str(root / "shards"), "--shard-size", "40KB")
        yield s3_server, root


def reader(server: S3Server, settings: OrderSettings = BLOCKS, cache_bytes: int | None = None) -> ShardedImages:
    ds = ShardedImages(SPLIT, StorageSpec(endpoint_url=server.endpoint), decode.Decoding(), settings)
    ds.cache_bytes = cache_bytes  # data.storage.cache_bytes
    return ds


def views(base: ShardedImages) -> loaders.PretrainViews:
    return loaders.PretrainViews(base, transforms.TwoViewTransform(16, "spatial_consistent_color"), 5)


def batches(base: ShardedImages, start: int, total: int, world: int, workers: int) -> list[torch.Tensor]:
    """First views of global batches start..total-1 (8 images each), ranks' shares concatenated."""
    data = views(base)
    order = loaders.shard_local_order(data, 8, 5, total)
    assert order is not None
    out = []
    for rank in range(world):
        sampler = loaders.StepBatchSampler(len(base), 8, 5, start, total, rank, world, order)
        out.append([b[0] for b in loaders.step_loader(data, sampler, workers)])
    return [torch.cat(parts) for parts in zip(*out)]


def gets(server: S3Server) -> int:
    return len(server.requests("GET", "/order/in/train/shard-"))


def test_block_reads_give_the_order_exactly_in_few_gets(shards: tuple[S3Server, Path], monkeypatch) -> None:
    server, root = shards
    isolated_aws_env(monkeypatch, root)
    base = reader(server)
    data = views(base)
    order = BlockOrder(base.shard_counts, 5, 4, 2)
    perm = order.permutation(0)
    before = gets(server)
    got = [data[(0, int(i))][0] for i in perm]
    local = ShardedImages(str(root / "shards" / "train"), decoding=decode.Decoding(), order=BLOCKS)
    assert all(torch.equal(a, views(local)[(0, int(i))][0]) for a, i in zip(got, perm))  # same bits as file://
    assert base.image_requests == len(perm)  # not following an order: one GET per image
    assert gets(server) - before == len(perm)

    base = reader(server)
    data = views(base)
    assert loaders.shard_local_order(data, 8, 5, 6) is not None  # one epoch of 6 steps
    before = gets(server)
    got = [data[(0, int(i))][0] for i in perm]
    assert all(torch.equal(a, views(local)[(0, int(i))][0]) for a, i in zip(got, perm))
    stats = base.cache_stats
    blocks = len(order.starts)
    assert stats.requests == blocks == gets(server) - before  # each block fetched once: no image read twice
    assert set(stats.fetches.values()) == {1} and base.image_requests == 0
    spans = base.following
    assert spans is not None and stats.bytes_fetched == int((spans.hi - spans.lo).sum())
    assert stats.peak_bytes <= 2 * 2 * int((spans.hi - spans.lo).max())  # two windows of the largest blocks


@functools.cache
def in_place(root: Path) -> list[torch.Tensor]:
    """Global batches 0..13 read in place from the file:// shards, in the same order."""
    return batches(ShardedImages(str(root / "shards" / "train"), decoding=decode.Decoding(), order=BLOCKS), 0, 14, 1, 0)


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (2, 0), (1, 2), (2, 2)])
def test_same_bits_from_any_step_at_any_ranks_and_workers_with_a_small_cache(
    shards: tuple[S3Server, Path], monkeypatch, world: int, workers: int
) -> None:
    server, root = shards
    isolated_aws_env(monkeypatch, root)
    reference = in_place(root)
    probe = reader(server)
    loaders.shard_local_order(views(probe), 8, 5, 14)
    assert probe.following is not None
    spans = probe.following.hi - probe.following.lo
    small = reader(server, cache_bytes=3 * int(spans.max()))  # three blocks: less than two windows
    before = gets(server)
    resumed = batches(small, 5, 14, world, workers)  # resumed mid-epoch, on through two more epochs
    assert len(resumed) == 9 and all(torch.equal(a, b) for a, b in zip(resumed, reference[5:]))
    assert gets(server) - before <= world * max(workers, 1) * len(spans) * 3  # a block at most once an epoch
    if workers == 0:
        assert small.cache_stats.peak_bytes <= small.cache_bytes


def test_a_damaged_block_in_the_cache_is_fetched_again(shards: tuple[S3Server, Path], monkeypatch, caplog) -> None:
    server, root = shards
    isolated_aws_env(monkeypatch, root)
    base = reader(server)
    loaders.shard_local_order(views(base), 8, 5, 6)
    first = base.encoded(0, 0)
    reads = base._reads
    assert reads is not None
    entry = reads.cache._entries[0]
    os.ftruncate(entry.done.result().fileno(), 600)  # the cached block loses its tail
    assert base.encoded(3, 0)[1] == base.encoded(3)[1] and base.encoded(0, 0) == first
    assert reads.cache.stats.fetches[0] == 2 and "fetching s3://order/in/train/shard-000000.tar again" in caplog.text


def test_a_truncated_or_damaged_shard_in_the_store_is_refused_by_name(
    shards: tuple[S3Server, Path], monkeypatch
) -> None:
    server, root = shards
    isolated_aws_env(monkeypatch, root)
    base = reader(server)
    loaders.shard_local_order(views(base), 8, 5, 6)
    fs = base.source.get()
    original = fs.cat_file("order/in/train/shard-000001.tar")
    try:
        fs.pipe_file("order/in/train/shard-000001.tar", original[:5000])
        truncated = r"shard-000001.tar: (bytes \[\d+, \d+\) came back as|no bytes at).*truncated"
        with pytest.raises(ShardIndexError, match=truncated):
            base.encoded(base.shard_counts[0] + 1, 0)
        damaged = bytearray(original)
        damaged[int(base.members[base.shard_counts[0]]["offset"]) - 512] ^= 0xFF  # its first member's header
        fs.pipe_file("order/in/train/shard-000001.tar", bytes(damaged))
        with pytest.raises(ShardIndexError, match=rf"shard-000001.tar: sample {base.shard_counts[0]} at byte"):
            base.encoded(base.shard_counts[0], 0)
    finally:
        fs.pipe_file("order/in/train/shard-000001.tar", original)


def test_a_cache_bound_below_one_block_is_refused(shards: tuple[S3Server, Path], monkeypatch) -> None:
    server, root = shards
    isolated_aws_env(monkeypatch, root)
    with pytest.raises(CacheBoundError, match="smaller than a block"):
        loaders.shard_local_order(views(reader(server, cache_bytes=1000)), 8, 5, 6)


# ------------------------------------------------------------------------------ pretraining killed and resumed

BLOCK_DEFAULTS = (
    "from extrema.data import shard_order as o; o.DEFAULT_ORDER, o.DEFAULT_BLOCK, o.DEFAULT_WINDOW = 'blocks', 4, 2"
)


def test_pretrain_with_block_reads_killed_and_resumed_gives_the_same_bits(
    shards: tuple[S3Server, Path], tmp_path: Path, monkeypatch
) -> None:
    server, _ = shards
    isolated_aws_env(monkeypatch, tmp_path)
    monkeypatch.setattr(shard_order, "DEFAULT_ORDER", "blocks")
    monkeypatch.setattr(shard_order, "DEFAULT_BLOCK", 4)
    monkeypatch.setattr(shard_order, "DEFAULT_WINDOW", 2)
    data: dict[str, Any] = {
        "dataset": "shards",
        "root": "s3://order/in",
        "storage": {"endpoint_url": server.endpoint},
        "num_workers": 2,
    }
    setup: dict[str, Any] = {"pretrain": {"steps": 8, "ckpt_every": 2, "keep_last": 4}, "data": data}
    reference, run = tmp_path / "reference", tmp_path / "killed"
    make_run(str(reference), setup)
    make_run(str(run), setup)
    assert entry.main([str(reference), "pretrain"]) == 0
    code = f"{BLOCK_DEFAULTS}; import sys; from extrema import entry; sys.exit(entry.main(sys.argv[1:]))"
    kill_mid_run_then_resume_equals(run, reference, ["-c", code])
    assert np.isfinite(list(last_losses(run / "pretrain").values())).all()
