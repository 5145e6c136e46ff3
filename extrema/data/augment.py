"""Batched colour augmentation of the two views, applied on the training device.

The loader crops and flips each image (torchvision v2, per sample) and draws each view's colour parameters with
torchvision's own `ColorJitter.make_params`; this module applies those per-sample parameters to a whole batch
at once with the same arithmetic as torchvision's colour kernels. Per-sample colour ops on 2 CPU cores cannot
feed a training step; one batched pass on the device can.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2.functional._color import _rgb_to_hsv

from extrema.models.vit import IMAGENET_MEAN, IMAGENET_STD

# Per-view colour parameters: jitter applied?, brightness, contrast, saturation, hue, grayscale?, order (4 op ids).
NUM_COLOR_PARAMS = 10
JITTER_P, GRAYSCALE_P = 0.8, 0.2


def color_jitter() -> v2.ColorJitter:
    """The colour jitter of the reference recipe: brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1."""
    return v2.ColorJitter(0.4, 0.4, 0.2, 0.1)


def sample_color_params(jitter: v2.ColorJitter, image: Tensor) -> Tensor:
    """One view's parameters of RandomApply(jitter, 0.8) -> RandomGrayscale(0.2), from the global CPU RNG.

    Draws exactly what those v2 transforms draw, in the same order, so both paths give the same views.
    """
    row = [0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0]
    if torch.rand(1).item() < JITTER_P:
        p = jitter.make_params([image])
        factors = [p["brightness_factor"], p["contrast_factor"], p["saturation_factor"], p["hue_factor"]]
        row = [1.0, *factors, 0.0, *p["fn_idx"].tolist()]
    row[5] = float(torch.rand(1).item() < GRAYSCALE_P)
    return torch.tensor(row, dtype=torch.float32)


def grayscale(x: Tensor) -> Tensor:
    """ITU-R 601 luma of (B, 3, H, W) -> (B, 1, H, W), as torchvision computes it."""
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def blend(x: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    """ratio * x + (1 - ratio) * other, clamped to [0, 1]; ratio is per sample (B,).

    At ratio exactly 1.0 this is x * 1 + other * 0 clamped, which is x bit for bit for any x in [0, 1] and
    finite `other`: the batched path leans on that to leave unselected samples untouched without indexing.
    """
    r = ratio.view(-1, 1, 1, 1)
    return (x * r).add_(other * (1 - r)).clamp_(0, 1)


@functools.cache
def _hsv_select(device: torch.device) -> Tensor:
    """torchvision's table of (v, p, q, t) -> (r, g, b) indices per hue sextant, resident on `device` once."""
    return torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]], dtype=torch.long, device=device)


def _hsv_to_rgb(img: Tensor) -> Tensor:
    """torchvision's `_hsv_to_rgb` for (B, 3, H, W), with its index table cached on the device instead of copied
    from the host on every call (the arithmetic, and so the result, is the same bit for bit)."""
    h, s, v = img.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(dtype=torch.int32)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    i.remainder_(6)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    # The same indices as torchvision's `table[:, i]`, gathered with index_select (several times faster on CPU).
    select = _hsv_select(img.device).index_select(1, i.flatten()).view(3, *i.shape).moveaxis(0, -3)
    return vpqt.gather(-3, select)


def adjust(x: Tensor, op: int, factor: Tensor) -> Tensor:
    """Brightness (0), contrast (1), saturation (2) or hue (3) with per-sample factors, torchvision's formulas."""
    if op == 0:
        return blend(x, torch.zeros_like(x), factor)
    if op == 1:
        return blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)
    if op == 2:
        return blend(x, grayscale(x), factor)
    hsv = _rgb_to_hsv(x)
    h, s, v = hsv.unbind(dim=1)
    h = (h + factor.view(-1, 1, 1)).remainder(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=1))


def _blend_at(x: Tensor, params: Tensor, op: Tensor, active: Tensor) -> Tensor:
    """Brightness, contrast or saturation (`op` 0, 1, 2 per sample) on the whole batch, as one blend.

    The `other` term is picked per sample (zeros, the mean luma, the luma) and the factor is the sample's own
    where `active`, exactly 1.0 elsewhere, which leaves those samples bit for bit as they were (see `blend`).
    """
    factor = params[:, 1:4].gather(1, op.clamp(0, 2).unsqueeze(1)).squeeze(1)
    factor = torch.where(active, factor, 1.0)
    luma = grayscale(x)
    per_sample = (-1, 1, 1, 1)
    contrast_or_saturation = torch.where((op == 1).view(per_sample), luma.mean(dim=(1, 2, 3), keepdim=True), luma)
    return blend(x, torch.where((op == 0).view(per_sample), 0.0, contrast_or_saturation), factor)


def apply_color(x: Tensor, params: Tensor) -> Tensor:
    """Float images in [0, 1] (B, 3, H, W) and per-view parameters (B, 10) -> colour-augmented images.

    Never synchronises with the host: every step runs on the whole batch with static shapes and samples that
    do not take it keep their pixels bit for bit. Each sample's order (a permutation of the 4 ops, as
    `sample_color_params` draws it) is split at its hue op: up to 3 blends before it (positions 0-2), the hue
    shift on the whole batch once (kept with `torch.where` where jitter is applied: the rgb -> hsv -> rgb round
    trip is not an identity), then up to 3 blends after it (positions 1-3). Every sample so sees its own ops in
    its own order, with the same arithmetic as applying them one by one.
    """
    params = params.to(x.device)
    applied = params[:, 0] > 0.5
    order = params[:, 6:10].long()
    hue_pos = (order == 3).long().argmax(dim=1)
    for pos in range(3):
        x = _blend_at(x, params, order[:, pos], applied & (hue_pos > pos))
    x = torch.where(applied.view(-1, 1, 1, 1), adjust(x, 3, params[:, 4]), x)
    for pos in range(1, 4):
        x = _blend_at(x, params, order[:, pos], applied & (hue_pos < pos))
    gray = (params[:, 5] > 0.5).view(-1, 1, 1, 1)
    return torch.where(gray, grayscale(x).expand_as(x), x)


@functools.cache
def _mean_std(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """ImageNet mean and std as (1, 3, 1, 1) constants, created on `device` once (no host copy per step)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1)
    return mean, std


def normalize(x: Tensor) -> Tensor:
    """ImageNet mean/std normalisation of float images in [0, 1]."""
    mean, std = _mean_std(x.device, x.dtype)
    return (x - mean) / std


def two_views(crops: Tensor, params: Tensor, color: bool) -> tuple[Tensor, Tensor]:
    """uint8 crops (B, 3, S, S) + colour parameters (B, 2, 10) -> the two normalised views.

    Without colour both views are the same tensor: masking is the only difference between the branches.
    No step of it synchronises the device with the host.
    """
    x = crops.float().div_(255)
    if not color:
        view = normalize(x)
        return view, view
    return normalize(apply_color(x, params[:, 0])), normalize(apply_color(x, params[:, 1]))
