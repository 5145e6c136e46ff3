"""Batched colour augmentation of the two views, applied on the training device.

The loader crops and flips each image (torchvision v2, per sample) and draws each view's colour parameters with
torchvision's own `ColorJitter.make_params`; this module applies those per-sample parameters to a whole batch
at once with the same arithmetic as torchvision's colour kernels. Per-sample colour ops on 2 CPU cores cannot
feed a training step; one batched pass on the device can.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
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
    """ratio * x + (1 - ratio) * other, clamped to [0, 1]; ratio is per sample (B,)."""
    r = ratio.view(-1, 1, 1, 1)
    return (x * r + other * (1 - r)).clamp(0, 1)


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


def apply_color(x: Tensor, params: Tensor) -> Tensor:
    """Float images in [0, 1] (B, 3, H, W) and per-view parameters (B, 10) -> colour-augmented images."""
    params = params.to(x.device)
    applied = params[:, 0] > 0.5
    order = params[:, 6:10].long()
    x = x.clone()
    for pos in range(4):
        for op in range(4):
            sel = (applied & (order[:, pos] == op)).nonzero().squeeze(1)
            if sel.numel():
                x[sel] = adjust(x[sel], op, params[sel, 1 + op])
    gray = (params[:, 5] > 0.5).view(-1, 1, 1, 1)
    return torch.where(gray, grayscale(x).expand_as(x), x)


def normalize(x: Tensor) -> Tensor:
    """ImageNet mean/std normalisation of float images in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def two_views(crops: Tensor, params: Tensor, color: bool) -> tuple[Tensor, Tensor]:
    """uint8 crops (B, 3, S, S) + colour parameters (B, 2, 10) -> the two normalised views.

    Without colour both views are the same tensor: masking is the only difference between the branches.
    """
    x = crops.float().div_(255)
    if not color:
        view = normalize(x)
        return view, view
    return normalize(apply_color(x, params[:, 0])), normalize(apply_color(x, params[:, 1]))
