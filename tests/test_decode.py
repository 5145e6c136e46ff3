"""Decoding for training crops: reduced-size JPEG decoding keeps the crop region and every random draw, and the
device-decode path (nvJPEG on CUDA) falls back to the CPU with the same batches as the host path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from extrema import data, decode
from extrema.dist import World
from extrema.spec import DataSpec
from tests.test_shards import shard, smooth_image, write_jpeg_folder


def jpeg(h: int, w: int, seed: int = 0) -> bytes:
    return bytes(encode_jpeg(smooth_image(torch.Generator().manual_seed(seed), h, w), quality=90).numpy())


def seeded(fn, seed: int = 7):  # type: ignore[no-untyped-def]
    """fn() under a fixed global RNG seed, and the next draw after it (to compare the draws it consumed)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = fn()
        return out, torch.rand(1).item()


def test_reduced_decode_keeps_the_crop_region_and_the_random_draws() -> None:
    t = data.TwoViewTransform(32, "spatial_consistent_color", crop_min=0.9)
    big = jpeg(400, 520)  # every crop of >= 90% area is over 8x the 32-px output: decoded at 1/8
    full, after_full = seeded(lambda: t.geometry(decode.decode_rgb(big)))
    reduced, after_reduced = seeded(lambda: t.crop_encoded(big, reduced=True))
    box, _ = seeded(lambda: t.crop_params(400, 520))
    assert decode.dct_scale(box[2], box[3], 32) == 8
    assert after_full == after_reduced  # the same draws, in the same order: colour and masks follow unchanged
    assert reduced.shape == full.shape == (3, 32, 32) and reduced.dtype == torch.uint8
    assert (reduced.float() - full.float()).abs().mean() < 4  # the same region, resampled from a smaller decode
    other, _ = seeded(lambda: t.crop_encoded(big, reduced=True), seed=8)
    assert (other.float() - full.float()).abs().mean() > 4 * (reduced.float() - full.float()).abs().mean()


@pytest.mark.parametrize("kind", ["small jpeg", "png"])
def test_without_a_reduction_the_crop_is_the_full_decode_path(kind: str) -> None:
    t = data.TwoViewTransform(32, "spatial_consistent_color")
    img = smooth_image(torch.Generator().manual_seed(1), 50, 60)
    blob = jpeg(50, 60, 1) if kind == "small jpeg" else bytes(encode_png(img).numpy())
    full, after_full = seeded(lambda: t.geometry(decode.decode_rgb(blob)))
    reduced, after_reduced = seeded(lambda: t.crop_encoded(blob, reduced=True))
    assert torch.equal(full, reduced) and after_full == after_reduced


def test_device_decode_falls_back_to_the_cpu_with_the_host_batches(tmp_path: Path) -> None:
    write_jpeg_folder(tmp_path / "folder", {"train": 6})
    shard(str(tmp_path / "folder"), str(tmp_path / "shards"))
    world = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"))

    def batches(decode_on: str) -> list[tuple[torch.Tensor, ...]]:
        spec = DataSpec(dataset="shards", root=str(tmp_path / "shards"), decode=decode_on, reduced_decode=False)  # type: ignore[arg-type]
        base = data.build_dataset(spec, "train")
        transform = data.TwoViewTransform(16, "spatial_consistent_color", device_color=True)
        views = data.PretrainViews(base, transform, 3, mask_fn=lambda g: torch.randperm(16, generator=g)[:4])
        assert views.device_decode == (decode_on == "gpu")
        return list(data.step_batches(views, 6, 3, 0, 4, world, 0))

    host, device = batches("cpu"), batches("gpu")
    assert len(host) == len(device) == 4
    for a, b in zip(host, device):
        assert len(a) == len(b) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))
