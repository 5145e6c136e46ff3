"""Decoding for training crops: reduced-size JPEG decoding keeps the crop region and every random draw, and the
device-decode path (nvJPEG on CUDA) falls back to the CPU with the same batches as the host path."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.io import encode_jpeg, encode_png

from extrema.data import datasets, decode, loaders, transforms
from extrema.spec import DataSpec
from extrema.train.dist import World
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
    t = transforms.TwoViewTransform(32, "spatial_consistent_color", crop_min=0.9)
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
    t = transforms.TwoViewTransform(32, "spatial_consistent_color")
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
        base = datasets.build_dataset(spec, "train")
        transform = transforms.TwoViewTransform(16, "spatial_consistent_color", device_color=True)
        views = loaders.PretrainViews(base, transform, 3, mask_fn=lambda g: torch.randperm(16, generator=g)[:4])
        assert views.device_decode == (decode_on == "gpu")
        return list(loaders.step_batches(views, 6, 3, 0, 4, world, 0))

    host, device = batches("cpu"), batches("gpu")
    assert len(host) == len(device) == 4
    for a, b in zip(host, device):
        assert len(a) == len(b) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------- Odd files in a real dataset

ODD = {  # file name -> (format, PIL mode, save options); every one a file ImageNet-style folders can hold
    "baseline.JPEG": ("JPEG", "RGB", {"quality": 90}),
    "progressive.JPEG": ("JPEG", "RGB", {"quality": 90, "progressive": True}),
    "cmyk.JPEG": ("JPEG", "CMYK", {"quality": 90}),  # 4 components, Adobe marker: not for nvJPEG
    "gray.JPEG": ("JPEG", "L", {"quality": 90}),
    "adobe_rgb.JPEG": ("JPEG", "RGB", {"quality": 90, "keep_rgb": True}),  # RGB-coded, not YCbCr
    "png.JPEG": ("PNG", "RGB", {}),  # ImageNet's train set holds such a PNG
    "webp.webp": ("WEBP", "RGB", {"quality": 90}),
    "bmp.bmp": ("BMP", "RGB", {}),  # torchvision does not read BMP: PIL does
}
NVJPEG = {"baseline.JPEG", "progressive.JPEG", "gray.JPEG"}


def odd_images() -> dict[str, bytes]:
    """The ODD files, each a different size, of smooth colour blobs."""
    out = {}
    for k, (name, (fmt, mode, options)) in enumerate(ODD.items()):
        img = smooth_image(torch.Generator().manual_seed(k), 36 + k, 40 + 3 * k).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(img).convert(mode).save(buf, fmt, **options)
        out[name] = buf.getvalue()
    return out


def write_odd_folder(root: Path) -> None:
    """root/train/<class>/<odd file>, the odd files shared between two classes."""
    for k, (name, blob) in enumerate(odd_images().items()):
        (root / "train" / ("cat", "dog")[k % 2]).mkdir(parents=True, exist_ok=True)
        (root / "train" / ("cat", "dog")[k % 2] / name).write_bytes(blob)


def test_only_8_bit_baseline_or_progressive_ycbcr_or_gray_jpegs_go_to_nvjpeg() -> None:
    blobs = odd_images()
    routed = decode.nvjpeg_routed([decode.as_tensor(b) for b in blobs.values()])
    assert dict(zip(blobs, routed)) == {name: name in NVJPEG for name in blobs}
    frames = {name: decode.jpeg_frame(blob) for name, blob in blobs.items()}
    assert frames["progressive.JPEG"] == decode.JpegFrame(0xC2, 8, (1, 2, 3), None)
    assert frames["cmyk.JPEG"] == decode.JpegFrame(0xC0, 8, (67, 77, 89, 75), 0)
    assert frames["gray.JPEG"] == decode.JpegFrame(0xC0, 8, (1,), None)
    assert frames["png.JPEG"] is None and frames["bmp.bmp"] is None
    base = blobs["baseline.JPEG"]
    sof = base.index(b"\xff\xc0")
    extended = base[: sof + 1] + b"\xc1" + base[sof + 2 :]  # extended sequential: libjpeg's, not nvJPEG's
    twelve_bit = base[: sof + 4] + b"\x0c" + base[sof + 5 :]
    assert decode.nvjpeg_routed([decode.as_tensor(b) for b in (extended, twelve_bit, b"\xff\xd8", b"")]) == [False] * 4


def test_decode_batch_on_the_cpu_reads_every_format_as_decode_rgb() -> None:
    blobs = odd_images()
    images = decode.decode_batch([decode.as_tensor(b) for b in blobs.values()], torch.device("cpu"))
    for (name, blob), img in zip(blobs.items(), images):
        assert img.dtype == torch.uint8 and img.shape[0] == 3 and torch.equal(img, decode.decode_rgb(blob)), name
        _, h, w = img.shape
        assert decode.image_size(blob) == (h, w), name
    gray = images[list(blobs).index("gray.JPEG")]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_an_image_no_decoder_reads_is_named_by_its_place_in_the_batch() -> None:
    good = odd_images()["baseline.JPEG"]
    cut = good[: good.index(b"\xff\xda") + 20]  # a JPEG header, its scan cut short
    for bad in (b"not an image", cut, b""):
        with pytest.raises(ValueError, match="image 1 of the batch"):
            decode.decode_batch([decode.as_tensor(good), decode.as_tensor(bad)], torch.device("cpu"))


def test_a_batch_nvjpeg_refuses_is_decoded_image_by_image(monkeypatch: pytest.MonkeyPatch) -> None:
    blobs = odd_images()
    names = sorted(NVJPEG)
    refused = decode.as_tensor(blobs["gray.JPEG"])
    real = decode.decode_jpeg

    def picky(data, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(data, list) or data is refused:  # refuse the batch, and the grayscale JPEG on its own
            raise RuntimeError("nvjpeg refused it")
        return real(data, **kwargs)

    monkeypatch.setattr(decode, "decode_jpeg", picky)
    datas = [refused if name == "gray.JPEG" else decode.as_tensor(blobs[name]) for name in names]
    images = decode.nvjpeg_batch(datas, [3, 5, 7], torch.device("cpu"))
    assert all(torch.equal(img, decode.decode_rgb(blobs[name])) for name, img in zip(names, images))


@pytest.mark.parametrize("dataset", ["imagefolder", "shards"])
def test_device_decode_of_a_folder_of_odd_files_gives_the_host_batches(tmp_path: Path, dataset: str) -> None:
    write_odd_folder(tmp_path / "imagefolder")
    if dataset == "shards":
        shard(str(tmp_path / "imagefolder"), str(tmp_path / "shards"))
    world = World(rank=0, size=1, local_rank=0, device=torch.device("cpu"))

    def batches(decode_on: str) -> list[tuple[torch.Tensor, ...]]:
        spec = DataSpec(dataset=dataset, root=str(tmp_path / dataset), decode=decode_on, reduced_decode=False)  # type: ignore[arg-type]
        transform = transforms.TwoViewTransform(16, "spatial_consistent_color", device_color=True)
        views = loaders.PretrainViews(datasets.build_dataset(spec, "train"), transform, 3)
        assert len(views) == len(ODD) and views.device_decode == (decode_on == "gpu")
        return list(loaders.step_batches(views, 4, 3, 0, 4, world, 0))

    host, device = batches("cpu"), batches("gpu")
    assert len(host) == len(device) == 4
    for a, b in zip(host, device):
        assert len(a) == len(b) == 3 and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_nvjpeg_decodes_the_odd_files_as_the_cpu_does() -> None:
    blobs = odd_images()
    datas = [decode.as_tensor(b) for b in blobs.values()]
    images = decode.decode_batch(datas, torch.device("cuda"))
    for (name, blob), img in zip(blobs.items(), images):
        cpu = decode.decode_rgb(blob)
        assert img.device.type == "cuda" and img.dtype == torch.uint8 and img.shape == cpu.shape, name
        diff = (img.cpu().float() - cpu.float()).abs()
        assert diff.mean() < 1.5 and diff.max() <= 24, (name, diff.mean().item(), diff.max().item())
    with pytest.raises(ValueError, match="image 1 of the batch"):
        decode.decode_batch([datas[0], decode.as_tensor(b"not an image")], torch.device("cuda"))


def test_the_size_of_a_file_pil_cannot_read_comes_from_a_cpu_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    blob = odd_images()["png.JPEG"]
    size = decode.image_size(blob)

    def unreadable(data: bytes) -> decode.Header:
        raise UnidentifiedImageError("PIL has no plugin for it")

    monkeypatch.setattr(decode, "read_header", unreadable)
    assert decode.image_size(blob) == size == tuple(decode.decode_rgb(blob).shape[1:])
    t = transforms.TwoViewTransform(16, "spatial_consistent_color")
    with_pil, _ = seeded(lambda: t.deferred(blob))
    assert with_pil[1].tolist() == seeded(lambda: list(t.crop_params(*size)))[0]
