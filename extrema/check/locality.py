"""The locality stage under fake tensors: the frozen encoder's class-token attention over one batch of images;
memory, the peak, and the FLOPs of every scored image.

The encoder is the stage's own (`build_vit`, frozen, on the meta device, then given fake storage) and the batch
goes through the stage's own `head_maps` (no autocast: the stage runs it in fp32 on any device). Scoring the maps
against the masks runs on the CPU and is left out. The whole stage is one step, as for knn: its FLOPs are an
image's times its images (`max_images`, else the dataset's: COCO val2017's images with an object, or the
canvases built). The `avgpool` design has no class token: the stage reports not applicable and the estimate is
zero.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from extrema.check.estimate import Target, fake_storage, fake_world, heading, local_bytes
from extrema.check.knn import tracked_peak
from extrema.models.vit import build_vit
from extrema.spec import Experiment
from extrema.stages.locality import head_maps

COCO_VAL_WITH_OBJECTS = 4_952  # COCO val2017's images with at least one annotation (the stage drops the others)


def scored_images(exp: Experiment) -> int:
    """Images the stage scores: max_images, else the dataset's."""
    s = exp.locality
    images = COCO_VAL_WITH_OBJECTS if s.dataset == "coco" else s.canvas_images
    return min(images, s.max_images or images)


def estimate_locality(exp: Experiment, nodes: int, processes_per_node: int, target: Target) -> dict[str, Any]:
    """Memory of the locality stage's forward batch (the encoder and its attention maps), the peak, and the FLOPs
    of all its images. Call in a fresh process; ValueError for more than one process (the stage refuses it)."""
    if nodes * processes_per_node > 1:
        raise ValueError("locality runs in one process: set its resources to processes_per_node 1, nodes 1")
    s = exp.locality
    size = s.img_size or exp.model.resolved_img_size
    os.environ["LOCAL_WORLD_SIZE"] = "1"
    world = fake_world(1)
    images = scored_images(exp)
    batch = min(s.batch_size, images)
    result = heading("locality", world, "none", target, None, batch, batch)
    result["scored_images"] = images
    fake = FakeTensorMode()
    with torch.device("meta"):
        encoder = build_vit(exp.model, drop_path_rate=0.0)
    if not encoder.has_cls_query:
        zero = dict.fromkeys(("parameters", "gradients", "optimizer", "activations", "peak"), 0)
        return result | {"applicable": False, "memory": zero, "flops_per_rank": 0, "flops_per_step": 0}
    if size % encoder.patch_size:
        raise ValueError(f"locality.img_size {size} is not a multiple of the patch size {encoder.patch_size}")
    encoder = fake_storage(encoder, fake, world.device).requires_grad_(False).eval()
    with fake:
        x = torch.zeros(batch, exp.model.in_chans, size, size, dtype=torch.uint8)
        peak, flops = tracked_peak([encoder, x], lambda: head_maps(encoder, x), False)
    params = local_bytes(encoder.parameters())
    total = round(flops * images / batch)  # FLOPs are per image: a batch's times the images
    memory = {"parameters": params, "gradients": 0, "optimizer": 0, "activations": peak - params, "peak": peak}
    return result | {"applicable": True, "memory": memory, "flops_per_rank": total, "flops_per_step": total}
