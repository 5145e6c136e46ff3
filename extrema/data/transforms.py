"""Transforms: the two-view pretraining transform and the evaluation crops."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from extrema.data import augment, decode
from extrema.data.augment import IMAGENET_MEAN, IMAGENET_STD
from extrema.data.datasets import Augmentation

# ------------------------------------------------------------------------------------------------- Transforms


def to_normalized() -> v2.Compose:
    """uint8 image -> float32 in [0, 1] -> ImageNet-normalized."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TwoViewTransform:
    """Two views of one image: a shared crop and flip, then independent colour (or none: the same tensor twice).

    With `device_color` the colour stage is deferred: the call returns the uint8 crop and each view's colour
    parameters (drawn exactly as the v2 transforms draw them) for `extrema.data.augment.two_views` to apply to the
    whole batch on the training device.
    """

    def __init__(
        self, img_size: int, augmentation: Augmentation, crop_min: float = 0.2, device_color: bool = False
    ) -> None:
        if augmentation not in ("spatial_consistent_color", "spatial"):
            raise ValueError(f"unknown augmentation {augmentation!r}")
        self.augmentation = augmentation
        self.device_color = device_color
        self.size = img_size
        self.geometry = v2.Compose(
            [v2.RandomResizedCrop(img_size, scale=(crop_min, 1.0), antialias=True), v2.RandomHorizontalFlip()]
        )
        self.to_float = v2.ToDtype(torch.float32, scale=True)
        self.jitter = augment.color_jitter()
        # Colour runs on the float crop: the same ops as on uint8, without intermediate rounding and a little faster.
        self.color = v2.Compose(
            [v2.RandomApply([self.jitter], p=augment.JITTER_P), v2.RandomGrayscale(augment.GRAYSCALE_P)]
        )
        self.normalize = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)

    def __call__(self, img: Tensor) -> tuple[Tensor, Tensor]:
        return self.views(self.geometry(img))

    def crop_params(self, height: int, width: int) -> tuple[int, int, int, int, bool]:
        """(top, left, h, w, flip) for an image of that size, drawn from the global RNG exactly as `geometry` draws."""
        crop, flip = self.geometry.transforms
        p = crop.make_params([decode.shape_only(height, width)])
        return p["top"], p["left"], p["height"], p["width"], bool(torch.rand(1) < flip.p)

    def crop_encoded(self, data: bytes, reduced: bool) -> Tensor:
        """The uint8 crop of an encoded image, as `geometry` cuts it from the full decode; with `reduced`, a JPEG
        whose crop is 2, 4 or 8 times the output size is decoded at that fraction (the same region, one resample)."""
        try:
            header = decode.read_header(data) if reduced else None
        except (OSError, ValueError):  # a format PIL cannot read: torchvision may
            header = None
        if header is None or not header.jpeg:
            return self.geometry(decode.decode_rgb(data))
        top, left, h, w, flip = self.crop_params(header.height, header.width)
        scale = decode.dct_scale(h, w, self.size)
        if scale == 1:
            crop = F.resized_crop(decode.decode_rgb(data), top, left, h, w, [self.size, self.size], antialias=True)
        else:
            crop = decode.reduced_crop(data, (top, left, h, w), self.size, scale)
        return F.horizontal_flip(crop) if flip else crop

    def deferred(self, data: bytes) -> tuple[Tensor, Tensor, Tensor]:
        """For decoding on the device: the encoded bytes, (top, left, h, w, flip) and the views' colour parameters,
        drawn as the host path draws them. Any format `decode.decode_rgb` reads: the size from the header where PIL
        reads it, else from a CPU decode."""
        geometry = torch.tensor(self.crop_params(*decode.image_size(data)), dtype=torch.int64)
        if self.augmentation == "spatial":
            return decode.as_tensor(data), geometry, torch.empty(0)
        shape = decode.shape_only(self.size, self.size)
        color = torch.stack([augment.sample_color_params(self.jitter, shape) for _ in range(2)])
        return decode.as_tensor(data), geometry, color

    def views(self, crop: Tensor) -> tuple[Tensor, Tensor]:
        """The two views of a uint8 crop; with `device_color`, the crop and its views' colour parameters."""
        if self.device_color:
            if self.augmentation == "spatial":
                return crop, torch.empty(0)
            return crop, torch.stack([augment.sample_color_params(self.jitter, crop) for _ in range(2)])
        x = self.to_float(crop)
        if self.augmentation == "spatial":
            view = self.normalize(x)
            return view, view
        return self.normalize(self.color(x)), self.normalize(self.color(x))


def eval_crop_pct(img_size: int) -> float:
    """Evaluation centre-crop fraction: 0.875 at ImageNet sizes, none for small images."""
    return 1.0 if img_size <= 64 else 0.875


def eval_geometry(img_size: int, crop_pct: float = 0.875) -> Callable[[Tensor], Tensor]:
    """uint8 -> uint8: resize the short side to img_size / crop_pct, centre-crop img_size."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return v2.Compose([v2.Resize(int(img_size / crop_pct), antialias=True), v2.CenterCrop(img_size)])


def eval_transform(img_size: int, crop_pct: float = 0.875) -> Callable[[Tensor], Tensor]:
    """Resize the short side to img_size / crop_pct, centre-crop img_size, normalize."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return v2.Compose([v2.Resize(int(img_size / crop_pct), antialias=True), v2.CenterCrop(img_size), to_normalized()])


def classify_transform(img_size: int) -> Callable[[Tensor], Tensor]:
    """Linear-probe training transform: RandomResizedCrop (default scale), flip, normalize."""
    return v2.Compose([v2.RandomResizedCrop(img_size, antialias=True), v2.RandomHorizontalFlip(), to_normalized()])
