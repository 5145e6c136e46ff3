"""Image decoding for training crops: full decodes, reduced-size JPEG decodes (DCT scaling) that keep the crop
region, and batched JPEG decoding on the device (nvJPEG through torchvision) with crops cut after decoding."""

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
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_rgb(data: bytes) -> Tensor:
    """Any image file's bytes -> uint8 RGB (3, H, W), full size."""
    return decode_image(as_tensor(data), mode=ImageReadMode.RGB)


def read_header(data: bytes) -> Header:
    """The image's size and format from its header, without decoding it."""
    with Image.open(io.BytesIO(data)) as im:
        return Header(im.height, im.width, im.format == "JPEG")


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
    """JPEGs (1-D uint8 tensors) -> uint8 RGB images on `device`: one batched nvJPEG call on CUDA, else the CPU."""
    if device.type == "cuda":
        return list(decode_jpeg(list(datas), mode=ImageReadMode.RGB, device=device))
    return [decode_image(d, mode=ImageReadMode.RGB) for d in datas]


def crop_batch(images: Sequence[Tensor], geometry: Tensor, size: int) -> Tensor:
    """Decoded images + per-image (top, left, h, w, flip) rows -> (B, 3, size, size) uint8 crops on their device,
    cut and resized (antialiased bilinear) as torchvision's RandomResizedCrop and flip cut them."""
    crops = []
    for img, (top, left, h, w, flip) in zip(images, geometry.tolist()):
        crop = F.resized_crop(img, top, left, h, w, [size, size], antialias=True)
        crops.append(F.horizontal_flip(crop) if flip else crop)
    return torch.stack(crops)
