"""How well an attention map localises objects (Figure 2, DINO's protocol), as pure tensor functions.

Shapes: B images, h heads, (gh, gw) the patch grid, (H, W) pixels. A map is kept where it holds the top `mass` of
its attention (the patches whose attention, sorted high to low, sums to `mass` of the total), as in DINO's
visualisation; it is scored by Jaccard against a foreground mask, and by CorLoc: the box of its largest
4-connected component hits an object's box at IoU >= 0.5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CORLOC_IOU = 0.5


def keep_mass(attention: Tensor, mass: float) -> Tensor:
    """(..., N) non-negative attention -> bool (..., N): the fewest highest entries that hold `mass` of its sum.

    DINO's rule: sort ascending, normalise, keep the entries whose cumulative share is above 1 - mass.
    """
    values, order = attention.sort(dim=-1)
    share = values / values.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    kept_sorted = share.cumsum(dim=-1) > (1 - mass)
    return torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted)


def upsample(kept: Tensor, size: tuple[int, int]) -> Tensor:
    """Bool patch masks (..., gh, gw) -> bool pixel masks (..., H, W), nearest (each patch covers its pixels)."""
    lead = kept.shape[:-2]
    flat = kept.reshape(-1, 1, *kept.shape[-2:]).float()
    return (F.interpolate(flat, size=size, mode="nearest") > 0.5).reshape(*lead, *size)


def jaccard(pred: Tensor, truth: Tensor) -> Tensor:
    """Per-image intersection over union of bool masks (..., H, W) -> (...); 0 when both are empty."""
    inter = (pred & truth).flatten(-2).sum(-1).float()
    union = (pred | truth).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union))


def components(mask: Tensor) -> Tensor:
    """4-connected components of bool masks (B, gh, gw) -> int64 labels (B, gh, gw), 0 off the mask.

    Each cell starts with its own label and takes its neighbours' largest until nothing changes, so a
    component's label is its largest cell index + 1.
    """
    b, gh, gw = mask.shape
    labels = torch.arange(1, gh * gw + 1, device=mask.device).reshape(1, gh, gw).expand(b, -1, -1).clone()
    labels = labels * mask
    while True:
        padded = F.pad(labels, (1, 1, 1, 1))
        neighbours = torch.stack(
            [labels, padded[:, :-2, 1:-1], padded[:, 2:, 1:-1], padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]]
        )
        grown = neighbours.amax(dim=0) * mask
        if torch.equal(grown, labels):
            return labels
        labels = grown


def largest_component_box(mask: Tensor) -> Tensor:
    """Bool patch masks (B, gh, gw) -> the box (x0, y0, x1, y1) in patch units of each one's largest 4-connected
    component (B, 4), float; (0, 0, 0, 0) for an empty mask. Ties go to the component with the larger label."""
    labels = components(mask)
    b, gh, gw = mask.shape
    counts = torch.zeros(b, gh * gw + 1, dtype=torch.long, device=mask.device)
    counts.scatter_add_(1, labels.reshape(b, -1), torch.ones_like(labels.reshape(b, -1)))
    counts[:, 0] = 0
    best = counts.flip(1).argmax(dim=1)
    best = gh * gw - best  # argmax over the flipped counts: the largest label among the biggest components
    chosen = (labels == best.view(b, 1, 1)) & mask
    rows = chosen.any(dim=2)
    cols = chosen.any(dim=1)
    out = torch.zeros(b, 4)
    for i in range(b):
        r, c = rows[i].nonzero().flatten(), cols[i].nonzero().flatten()
        if len(r):
            out[i] = torch.tensor([c.min(), r.min(), c.max() + 1, r.max() + 1], dtype=torch.float32)
    return out


def box_iou(box: Tensor, boxes: Tensor) -> Tensor:
    """IoU of one box (4,) with boxes (N, 4), all (x0, y0, x1, y1) -> (N,)."""
    lt = torch.maximum(box[:2], boxes[:, :2])
    rb = torch.minimum(box[2:], boxes[:, 2:])
    inter = (rb - lt).clamp_min(0).prod(dim=1)
    area = (box[2:] - box[:2]).clamp_min(0).prod()
    areas = (boxes[:, 2:] - boxes[:, :2]).clamp_min(0).prod(dim=1)
    return inter / (area + areas - inter).clamp_min(1e-12)


def corloc_hits(pred_boxes: Tensor, truth_boxes: list[Tensor]) -> Tensor:
    """Whether each predicted box (B, 4) hits one of its image's boxes (N_i, 4) at IoU >= 0.5 -> bool (B,)."""
    return torch.tensor(
        [bool(len(t)) and bool((box_iou(p, t) >= CORLOC_IOU).any()) for p, t in zip(pred_boxes, truth_boxes)]
    )


def score_maps(
    attention: Tensor, foreground: Tensor, boxes: list[Tensor], patch_size: int, mass: float
) -> dict[str, Tensor]:
    """Per-image scores of attention maps (B, gh, gw) against foreground masks (B, H, W) and object boxes in
    pixels (a list of (N_i, 4)): {"jaccard": (B,), "corloc": bool (B,), "kept": bool (B, gh, gw)}."""
    b, gh, gw = attention.shape
    kept = keep_mass(attention.reshape(b, -1), mass).reshape(b, gh, gw)
    pixels = upsample(kept, (foreground.shape[-2], foreground.shape[-1]))
    pred_boxes = largest_component_box(kept) * patch_size
    return {"jaccard": jaccard(pixels, foreground), "corloc": corloc_hits(pred_boxes, boxes), "kept": kept}
