"""Figure 2: does the [cls] attention find the objects? DINO's protocol on any COCO-format set with masks.

    python -m extrema.entry <run-dir> locality     # reads <run-dir>/locality/spec.json

Reads top to bottom: the encoder (the run's pretrain checkpoint, locality.checkpoint of any kind, or a seeded random
init for the baseline), the images with objects (COCO-format files, or Fashion-MNIST garments on canvases built
once), each resized to a square; the class token's attention over the patches (`cls_attention`: the last
self-attention layer for `vit`, the last class-attention block for `cait`), averaged over heads and per head; the
patches that hold `mass` of it, scored by Jaccard against the union of the object masks and by CorLoc (the box of
their largest connected component against the object boxes, IoU >= 0.5). Scores are percentages. The `avgpool`
design has no class token: its result says not applicable.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor
from torchvision.transforms import v2

from extrema.data.augment import normalize
from extrema.data.datasets import seed_of
from extrema.data.detection import CocoDetection, canvas_set
from extrema.eval.locality import score_maps
from extrema.models.vit import VisionTransformer, build_vit
from extrema.run import rundir
from extrema.run.attempt import BARE, Attempt
from extrema.spec import Experiment, LocalitySpec, RunSpec
from extrema.train import weights
from extrema.train.dist import init_world

CANVAS_SOURCE = "t10k"  # held-out garments


def locality_set(exp: Experiment, s: LocalitySpec, stage_dir: str) -> CocoDetection:
    """The scored images (those with objects): COCO files, or the canvas set built once under canvas_dir."""
    if s.dataset == "coco":
        assert s.annotations and s.images  # LocalitySpec refuses 'coco' without them
        return CocoDetection(s.annotations, s.images, drop_empty=True)
    where = s.canvas_dir or rundir.join(stage_dir, "canvas")
    annotations, images = canvas_set(exp.data, s, where, s.canvas_images, CANVAS_SOURCE, seed_of(s.seed, 2))
    return CocoDetection(annotations, images, drop_empty=True)


def square_batch(dataset: CocoDetection, indices: list[int], size: int) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Images resized to size x size: (uint8 (B, 3, S, S), foreground bool (B, S, S), boxes in pixels [(N_i, 4)]).

    Masks and boxes are resized with their image; IoU and Jaccard are unchanged by the per-axis scaling.
    """
    resize = v2.Resize((size, size), antialias=True)
    images, foreground, boxes = [], [], []
    for i in indices:
        img, target = resize(*dataset[i])
        images.append(img.as_subclass(Tensor))
        foreground.append(target["masks"].as_subclass(Tensor).bool().any(dim=0))
        boxes.append(target["boxes"].as_subclass(Tensor).float())
    return torch.stack(images), torch.stack(foreground), boxes


def head_maps(encoder: VisionTransformer, images: Tensor) -> Tensor:
    """uint8 images (B, 3, S, S) -> the class token's attention over the patches per head (B, h, gh, gw)."""
    grid = images.shape[-1] // encoder.patch_size
    with torch.no_grad():
        attention = encoder.cls_attention(normalize(images.float() / 255))
    return attention.reshape(*attention.shape[:2], grid, grid).float()


def run(spec: RunSpec, stage_dir: str, attempt: Attempt = BARE) -> dict[str, Any]:
    """Score the class-token attention of an encoder against ground-truth masks and boxes. No checkpoint or metrics
    log: `attempt` is not used."""
    exp, s = spec.experiment, spec.experiment.locality
    world = init_world()
    if world.size > 1:
        raise ValueError("locality runs in one process: set its resources to processes_per_node 1, nodes 1")
    size = s.img_size or exp.model.resolved_img_size
    protocol = {
        "attention": "class token over patches, mean over heads (and each head)",
        "mass": s.mass,
        "dataset": s.dataset,
        "img_size": size,
        "init": s.init,
        "encoder": s.encoder,
        "cls_token": exp.model.cls_token,
        "corloc_iou": 0.5,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        encoder = build_vit(exp.model, drop_path_rate=0.0)
    if not encoder.has_cls_query:
        return {"locality_applicable": False, "note": "this design has no class token to query", "protocol": protocol}
    if size % encoder.patch_size:
        raise ValueError(f"locality.img_size {size} is not a multiple of the patch size {encoder.patch_size}")
    source = None if s.init == "random" else weights.weights_source(s.checkpoint, stage_dir)
    if source is not None:
        weights.load_encoder(encoder, source, s.encoder)
    encoder = encoder.requires_grad_(False).eval().to(world.device)

    dataset = locality_set(exp, s, stage_dir)
    order = list(range(len(dataset)))
    if s.max_images is not None and s.max_images < len(order):
        order = sorted(random.Random(s.seed).sample(order, s.max_images))
    if not order:
        raise ValueError("locality: no image with an object to score")
    mean_j, mean_c, head_j, head_c = [], [], [], []
    for start in range(0, len(order), s.batch_size):
        images, foreground, boxes = square_batch(dataset, order[start : start + s.batch_size], size)
        maps = head_maps(encoder, images.to(world.device)).cpu()
        scored = score_maps(maps.mean(dim=1), foreground, boxes, encoder.patch_size, s.mass)
        mean_j.append(scored["jaccard"])
        mean_c.append(scored["corloc"].float())
        per_head = [score_maps(maps[:, h], foreground, boxes, encoder.patch_size, s.mass) for h in range(maps.shape[1])]
        head_j.append(torch.stack([p["jaccard"] for p in per_head], dim=1))
        head_c.append(torch.stack([p["corloc"].float() for p in per_head], dim=1))
    heads_j, heads_c = torch.cat(head_j).mean(dim=0), torch.cat(head_c).mean(dim=0)
    return {
        "locality_applicable": True,
        "locality_jaccard": 100 * float(torch.cat(mean_j).mean()),
        "locality_corloc": 100 * float(torch.cat(mean_c).mean()),
        "locality_jaccard_best_head": 100 * float(heads_j.max()),
        "locality_corloc_best_head": 100 * float(heads_c.max()),
        "locality_jaccard_heads": [100 * float(v) for v in heads_j],
        "images": len(order),
        "checkpoint": source,
        "protocol": protocol,
    }
