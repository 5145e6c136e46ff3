"""kNN evaluation of a pretrained encoder (the DINO protocol): the standalone `knn` stage.

python -m extrema.entry <run-dir> knn     # evaluates the run's pretrain checkpoint (or knn.checkpoint)
"""

from __future__ import annotations

from typing import Any

import torch

from extrema.eval.knn_monitor import knn_monitor
from extrema.models.vit import VisionTransformer, build_vit
from extrema.run.attempt import BARE, Attempt
from extrema.spec import Experiment, RunSpec
from extrema.train import weights
from extrema.train.dist import init_world


def knn_encoder(exp: Experiment) -> VisionTransformer:
    """The encoder the stage evaluates, before its weights are loaded: the model's, without drop path."""
    return build_vit(exp.model, drop_path_rate=0.0)


def knn_autocast(device: torch.device) -> torch.dtype | None:
    """The stage's autocast dtype: bf16 on a GPU, none (fp32) on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else None


def run(spec: RunSpec, stage_dir: str, attempt: Attempt = BARE) -> dict[str, Any]:
    """Evaluate an encoder (any checkpoint kind: `weights.weights_source`) with kNN; top-1/top-5 plus the protocol.
    It commits nothing but its result, which the job entry writes: `attempt` is not used."""
    exp = spec.experiment
    world = init_world()
    url = weights.weights_source(exp.knn.checkpoint, stage_dir)
    encoder = knn_encoder(exp)
    weights.load_encoder(encoder, url, exp.knn.encoder)
    encoder = encoder.requires_grad_(False).eval().to(world.device)
    acc = knn_monitor(encoder, exp, world, knn_autocast(world.device))
    return {
        "knn_top1": acc["top1"],
        "knn_top5": acc["top5"],
        "checkpoint": url,
        "protocol": {
            "k": exp.knn.k,
            "temperature": exp.knn.temperature,
            "encoder": exp.knn.encoder,
            "feature": exp.knn.feature,
            "bank_size": exp.knn.bank_size,
            "val_size": exp.knn.val_size,
        },
    }
