"""Image decoding for training crops: full decodes, reduced-size JPEG decodes (DCT scaling) that keep the crop
region, and batched JPEG decoding on the device (nvJPEG through torchvision) with crops cut after decoding; the
images nvJPEG does not read (other formats, CMYK or 12-bit JPEGs) are decoded on the CPU."""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as F

SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers; C4 DHT, C8 JPG, CC DAC are not
DCT_SCALES = (8, 4, 2)  # libjpeg decodes at 1/8, 1/4 or 1/2 size almost for free
Image.MAX_IMAGE_PIXELS = 200_000_000  # refuse decompression bombs beyond ImageNet's largest images by far


@dataclass(frozen=True)
class Decoding:
    """How pretraining decodes a dataset's encoded images: at reduced size where it can, and on which device."""

    reduced: bool = True
    device: Literal["cpu", "gpu"] = "cpu"


@runtime_checkable
class EncodedImages(Protocol):
    """A labelled dataset that also hands out each image's encoded bytes, and says how to decode them."""

    decoding: Decoding

    def encoded(self, i: int) -> tuple[bytes, int]: ...


@dataclass(frozen=True)
class Header:
    """What an image file's header says: its full size and whether it is a JPEG."""

    height: int
    width: int
    jpeg: bool


def as_tensor(data: bytes) -> Tensor:
    """Encoded bytes as a 1-D uint8 tensor (a copy the tensor owns)."""
    if not data:  # an empty file: torch.frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_rgb(data: bytes | Tensor) -> Tensor:
    """Any image file's bytes (or 1-D uint8 tensor) -> uint8 RGB (3, H, W), full size, on the CPU."""
    encoded = data if isinstance(data, Tensor) else as_tensor(data)
    try:
        return decode_image(encoded, mode=ImageReadMode.RGB)
    except RuntimeError:  # formats torchvision does not read (BMP, TIFF, PPM/PGM): PIL does
        return pil_rgb(encoded.numpy().tobytes())


def pil_rgb(data: bytes) -> Tensor:
    """An image file's bytes decoded by PIL -> uint8 RGB (3, H, W); ValueError when PIL cannot read it either."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:  # UnidentifiedImageError, truncated files
        raise ValueError(f"not an image any decoder reads: {e}") from e
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()


def read_header(data: bytes) -> Header:
    """The image's size and format from its header, without decoding it."""
    with Image.open(io.BytesIO(data)) as im:
        return Header(im.height, im.width, im.format == "JPEG")


def image_size(data: bytes) -> tuple[int, int]:
    """(height, width) of an encoded image: from its header where PIL reads it, else from a full CPU decode."""
    try:
        header = read_header(data)
    except (OSError, ValueError):  # a format PIL cannot read: torchvision may
        _, height, width = decode_rgb(data).shape
        return height, width
    return header.height, header.width


@dataclass(frozen=True)
class JpegFrame:
    """What a JPEG's markers before its first scan say about its coding and colour space."""

    sof: int  # the frame marker's second byte: 0xC0 baseline, 0xC2 progressive, 0xC1/0xC3/0xC9.. others
    precision: int  # bits per sample
    component_ids: tuple[int, ...]
    adobe_transform: int | None  # the Adobe APP14 marker's colour transform (0 RGB/CMYK, 1 YCbCr, 2 YCCK)


def jpeg_frame(data: bytes | memoryview) -> JpegFrame | None:
    """The frame of a JPEG file from its markers up to the first scan, without decoding; None if not a JPEG."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, frame, adobe = 2, None, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None  # no marker where one must be: not a JPEG this parser understands
        marker = data[pos + 1]
        if marker == 0xFF or 0xD0 <= marker <= 0xD8 or marker == 0x01:  # fill byte, markers without a length
            pos += 1 if marker == 0xFF else 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan (or end of image): the frame is known by now
            break
        length = data[pos + 2] << 8 | data[pos + 3]
        body = data[pos + 4 : pos + 2 + length]
        if marker in SOF_MARKERS and len(body) >= 6:
            count = body[5]
            frame = (marker, body[0], tuple(body[6 + 3 * k] for k in range(count) if 6 + 3 * k < len(body)))
        elif marker == 0xEE and len(body) >= 12 and bytes(body[:5]) == b"Adobe":
            adobe = body[11]
        pos += 2 + length
    if frame is None:
        return None
    return JpegFrame(frame[0], frame[1], frame[2], adobe)


def nvjpeg_decodes(frame: JpegFrame | None) -> bool:
    """Whether nvJPEG decodes this JPEG frame: 8-bit baseline or progressive Huffman, grayscale or YCbCr (libjpeg's
    reading of three components, less RGB-coded ones); CMYK/YCCK, 12-bit, lossless and arithmetic go to the CPU."""
    if frame is None or frame.sof not in (0xC0, 0xC2) or frame.precision != 8:
        return False
    if len(frame.component_ids) == 1:
        return True
    rgb_ids = frame.component_ids == (ord("R"), ord("G"), ord("B"))
    return len(frame.component_ids) == 3 and frame.adobe_transform in (None, 1) and not rgb_ids


def nvjpeg_routed(datas: Sequence[Tensor]) -> list[bool]:
    """For each encoded image (1-D uint8 CPU tensor) of a batch, whether it goes to nvJPEG rather than the CPU."""
    return [nvjpeg_decodes(jpeg_frame(d.numpy().data)) for d in datas]


def dct_scale(crop_h: int, crop_w: int, out_size: int) -> int:
    """The largest s in (8, 4, 2) with the crop still at least out_size pixels a side at 1/s; 1 when none is."""
    return next((s for s in DCT_SCALES if crop_h >= s * out_size and crop_w >= s * out_size), 1)


def reduced_crop(data: bytes, box: tuple[int, int, int, int], size: int, scale: int) -> Tensor:
    """Decode a JPEG at 1/scale (DCT scaling) and resize the box (top, left, h, w in full-size pixels) to
    (3, size, size) uint8 with antialiased bilinear resampling: the same image region as a full-size crop."""
    top, left, h, w = box
    with Image.open(io.BytesIO(data)) as im:
        full_w, full_h = im.size
        im.draft("RGB", (full_w // scale, full_h // scale))
        done = next((s for s in (scale, 1) if (-(-full_w // s), -(-full_h // s)) == im.size), None)
        if done is None:
            raise ValueError(f"JPEG draft decoding gave {im.size} for {(full_w, full_h)} at 1/{scale}")
        scale = done
        rgb = im.convert("RGB")
    region = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
    out = rgb.resize((size, size), Image.Resampling.BILINEAR, box=region)
    return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).contiguous()


def shape_only(height: int, width: int) -> Tensor:
    """A (3, height, width) tensor without memory, for transforms that only ask an input's size."""
    return torch.empty((1, 1, 1), dtype=torch.uint8).expand(3, height, width)


def decode_batch(datas: Sequence[Tensor], device: torch.device) -> list[Tensor]:
    """Encoded images (1-D uint8 CPU tensors) -> uint8 RGB (3, H, W) on `device`, in batch order: the JPEGs nvJPEG
    decodes in one batched nvJPEG call on CUDA, every other image (and all of them without CUDA) on the CPU."""
    routed = nvjpeg_routed(datas) if device.type == "cuda" else [False] * len(datas)
    gpu = [i for i, r in enumerate(routed) if r]
    on_gpu = dict(zip(gpu, nvjpeg_batch([datas[i] for i in gpu], gpu, device)))
    return [on_gpu[i] if r else cpu_decode(datas[i], i).to(device) for i, r in enumerate(routed)]


def nvjpeg_batch(datas: list[Tensor], indices: list[int], device: torch.device) -> list[Tensor]:
    """JPEGs -> RGB on `device` in one batched nvJPEG call; if it refuses one, image by image (`indices`: their
    places in the batch, for errors)."""
    if not datas:
        return []
    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # a corrupt or unusual JPEG: find it, decoding the rest on nvJPEG still
        return [nvjpeg_one(d, i, device) for d, i in zip(datas, indices)]


def nvjpeg_one(data: Tensor, index: int, device: torch.device) -> Tensor:
    """One JPEG -> RGB on `device` by nvJPEG, or by the CPU where nvJPEG refuses it."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return cpu_decode(data, index).to(device)


def cpu_decode(data: Tensor, index: int) -> Tensor:
    """One encoded image -> uint8 RGB on the CPU; ValueError naming its `index` in the batch if nothing reads it."""
    try:
        return decode_rgb(data)
    except ValueError as e:
        raise ValueError(f"image {index} of the batch: {e}") from e


def crop_batch(images: Sequence[Tensor], geometry: Tensor, size: int) -> Tensor:
    """Decoded images + per-image (top, left, h, w, flip) rows -> (B, 3, size, size) uint8 crops on their device,
    cut and resized (antialiased bilinear) as torchvision's RandomResizedCrop and flip cut them."""
    crops = []
    for img, (top, left, h, w, flip) in zip(images, geometry.tolist()):
        crop = F.resized_crop(img, top, left, h, w, [size, size], antialias=True)
        crops.append(F.horizontal_flip(crop) if flip else crop)
    return torch.stack(crops)
