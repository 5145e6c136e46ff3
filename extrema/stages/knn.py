"""kNN evaluation of a pretrained encoder (the DINO protocol): the standalone `knn` stage.

python -m extrema.entry <run-dir> knn     # evaluates the run's pretrain checkpoint (or knn.checkpoint)
"""

from __future__ import annotations

from typing import Any

import torch

from extrema import ckpt, rundir
from extrema.dist import init_world
from extrema.knn_monitor import knn_monitor
from extrema.models.extrema import ExtreMA
from extrema.spec import RunSpec


def checkpoint_url(spec: RunSpec, stage_dir: str) -> str:
    """The checkpoint to evaluate: knn.checkpoint, else the newest complete step of the run's pretrain stage."""
    if spec.experiment.knn.checkpoint:
        url = spec.experiment.knn.checkpoint
        if ckpt.latest_step(url) is not None:
            return ckpt.step_url(url, ckpt.latest_step(url))  # type: ignore[arg-type]
        return url
    pretrain_ckpt = rundir.join(stage_dir.rstrip("/").rsplit("/", 1)[0], "pretrain", "ckpt")
    step = ckpt.latest_step(pretrain_ckpt)
    if step is None:
        raise FileNotFoundError(f"no complete pretrain checkpoint under {pretrain_ckpt}")
    return ckpt.step_url(pretrain_ckpt, step)


def run(spec: RunSpec, stage_dir: str) -> dict[str, Any]:
    """Evaluate a pretrain checkpoint with kNN and return top-1/top-5 plus the protocol."""
    exp = spec.experiment
    world = init_world()
    url = checkpoint_url(spec, stage_dir)
    model = ExtreMA(exp.model)
    branch = "target" if exp.knn.encoder == "ema" else "online"
    ckpt.load_module(url, getattr(model, branch).encoder, prefix=f"{branch}.encoder.")
    encoder = getattr(model, branch).encoder.to(world.device)
    acc = knn_monitor(encoder, exp, world, torch.bfloat16 if world.device.type == "cuda" else None)
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
