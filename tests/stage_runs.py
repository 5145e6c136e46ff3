"""Build run directories with a RunSpec per stage, for tests that execute real stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from extrema.run import rundir
from extrema.run.checkpoint_dirs import shard_rank
from extrema.spec import Experiment, RunSpec
from extrema.train import ckpt
from extrema.train.safe_dcp import SafeFsspecReader

TINY_EXPERIMENT: dict[str, Any] = {
    "model": {"arch": "vit_pico", "mlp_dim": 128, "proj_dim": 32, "drop_path_rate": 0.1},
    "data": {"dataset": "synthetic", "synthetic_size": 256, "num_workers": 0},
    "pretrain": {
        "steps": 12,
        "batch_size": 32,
        "base_lr": 1.5e-3,
        "warmup_epochs": 0.5,
        "ema_momentum": 0.99,
        "masking": {"ratio": 0.75, "num_masks": 4},
        "log_every": 1,
        "ckpt_every": 6,
        "knn_monitor": False,
    },
    "knn": {"bank_size": 256, "k": 10},
}


def shard(step_dir: Path, rank: int = 0) -> str:
    """The name of the one data file `rank` wrote in a complete step directory."""
    names = [p.name for p in step_dir.iterdir() if shard_rank(p.name) == rank]
    assert len(names) == 1, sorted(p.name for p in step_dir.iterdir())
    return names[0]


def shard_ranks(step_dir: Path) -> set[int]:
    """The ranks whose data files a step directory holds."""
    return {r for p in step_dir.iterdir() if (r := shard_rank(p.name)) is not None}


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `over` into a copy of `base`."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def make_run(run_dir: str, overrides: dict[str, Any] | None = None) -> Experiment:
    """Write `<run_dir>/<stage>/spec.json` for every stage of the tiny experiment (with overrides)."""
    exp = Experiment.model_validate(merge(TINY_EXPERIMENT, overrides or {}))
    for stage in exp.stages:
        spec = RunSpec(sweep="test", run_id="r0", stage=stage, experiment=exp)
        rundir.write_json(rundir.join(run_dir, stage, "spec.json"), spec.model_dump(mode="json"))
    return exp


def without_key_bias(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop attention key biases: their exact gradient is zero (softmax ignores a per-query constant), so Adam
    turns rounding noise, which differs with the reduction order, into lr-sized steps."""
    out = {}
    for k, v in sd.items():
        if k.endswith("attn.k.bias"):
            continue
        if k.endswith("attn.qkv.bias"):
            d = v.shape[0] // 3
            v = torch.cat([v[:d], v[2 * d :]])
        out[k] = v
    return out


def checkpointed_model(stage_dir: Path) -> dict[str, torch.Tensor]:
    """The `model.*` tensors of the latest complete checkpoint of a stage directory."""
    url = ckpt.step_url(str(stage_dir / "ckpt"), ckpt.latest_step(str(stage_dir / "ckpt")))  # type: ignore[arg-type]
    meta = SafeFsspecReader(url).read_metadata().state_dict_metadata
    tensors = {k: m for k, m in meta.items() if k.startswith("model.")}
    want = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in tensors.items()}  # type: ignore[union-attr]
    ckpt.load(url, want)
    return want
