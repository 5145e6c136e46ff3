"""Checkpoints with torch.distributed.checkpoint (DCP) on any fsspec URL.

Layout: `<ckpt>/step-<N>/` written by DCP; its `.metadata` file (renamed into place last) marks it complete,
and `<ckpt>/latest` names the newest complete step after the commit. A step directory without `.metadata`
is never chosen and is removed by `clean_incomplete`. Works in one plain process and under FSDP/DDP.
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from extrema import rundir

STEP_DIR = re.compile(r"^step-(\d+)$")
# DCP warns on every call without a process group; one plain process is a supported mode here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def step_url(ckpt_dir: str, step: int) -> str:
    """URL of the directory holding step N."""
    return rundir.join(ckpt_dir, f"step-{step}")


def is_rank0() -> bool:
    """Whether this process writes shared files (rank 0, or no process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def list_steps(ckpt_dir: str) -> dict[int, bool]:
    """Every step directory present -> whether it is complete (has DCP's `.metadata`)."""
    fs, path = rundir.filesystem(ckpt_dir)
    if not fs.exists(path):
        return {}
    out: dict[int, bool] = {}
    for entry in fs.ls(path, detail=False):
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        m = STEP_DIR.match(name)
        if m:
            out[int(m.group(1))] = bool(fs.exists(f"{path.rstrip('/')}/{name}/.metadata"))
    return out


def latest_step(ckpt_dir: str) -> int | None:
    """The newest complete step, or None."""
    complete = [s for s, ok in list_steps(ckpt_dir).items() if ok]
    return max(complete) if complete else None


def clean_incomplete(ckpt_dir: str) -> list[int]:
    """Remove step directories that never got their commit marker; returns the removed steps."""
    removed = []
    if is_rank0():
        fs, _ = rundir.filesystem(ckpt_dir)
        for s, ok in list_steps(ckpt_dir).items():
            if not ok:
                fs.rm(rundir.filesystem(step_url(ckpt_dir, s))[1], recursive=True)
                removed.append(s)
    return removed


def apply_retention(ckpt_dir: str, keep_last: int, keep_every: int | None = None) -> list[int]:
    """Delete complete steps beyond the newest `keep_last`, sparing multiples of `keep_every`."""
    if not is_rank0():
        return []
    steps = sorted(s for s, ok in list_steps(ckpt_dir).items() if ok)
    doomed = [s for s in steps[: max(0, len(steps) - keep_last)] if not (keep_every and s % keep_every == 0)]
    fs, _ = rundir.filesystem(ckpt_dir)
    for s in doomed:
        fs.rm(rundir.filesystem(step_url(ckpt_dir, s))[1], recursive=True)
    return doomed


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]) -> dict[str, Any]:
    """The DCP state dict of a training job: model, optimizer (FQN-keyed, shard-aware) and extras."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "extra": extra}


_pending: list[tuple[Any, str, int]] = []


def _point_latest(ckpt_dir: str, step: int) -> None:
    if is_rank0():
        rundir.write_text_atomic(rundir.join(ckpt_dir, "latest"), f"step-{step}\n")


def wait_pending() -> None:
    """Block until a background save has committed, then move the `latest` pointer to it."""
    while _pending:
        future, ckpt_dir, step = _pending.pop(0)
        future.result()
        _point_latest(ckpt_dir, step)


def save(ckpt_dir: str, step: int, state: dict[str, Any], background: bool = False) -> str:
    """Write one checkpoint collectively; `latest` moves only after DCP has committed `.metadata`.

    With `background`, tensors are staged to host memory and written by a thread while training goes on;
    a later save (or `wait_pending`) waits for it first. Background saves need a process group.
    """
    wait_pending()
    url = step_url(ckpt_dir, step)
    writer = FsspecWriter(url, sync_files=False)
    if background and dist.is_initialized():
        _pending.append((dcp.async_save(state, storage_writer=writer), ckpt_dir, step))
        return url
    dcp.save(state, storage_writer=writer)
    _point_latest(ckpt_dir, step)
    return url


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A plain, unsharded CPU state dict of a module (gathered from its shards under FSDP)."""
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def write_torch(url: str, obj: Any) -> None:
    """torch.save to any fsspec URL, atomically (write then rename)."""
    fs, path = rundir.filesystem(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp"
    with fs.open(tmp, "wb") as f:
        torch.save(obj, f)
    fs.mv(tmp, path)


def read_torch(url: str) -> Any:
    """torch.load(weights_only=True) from any fsspec URL."""
    fs, path = rundir.filesystem(url)
    with fs.open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def load(url: str, state: dict[str, Any]) -> None:
    """Load a checkpoint in place into `state` (any world size: DCP reshards)."""
    dcp.load(state, storage_reader=FsspecReader(url))


def restore(
    ckpt_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, Any]
) -> dict[str, Any] | None:
    """Resume from the newest complete step: fills model and optimizer, returns the saved extras (None if fresh)."""
    clean_incomplete(ckpt_dir)
    if dist.is_initialized():
        dist.barrier()
    step = latest_step(ckpt_dir)
    if step is None:
        return None
    state = training_state(model, optimizer, dict(extra))
    load(step_url(ckpt_dir, step), state)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return state["extra"]


def load_module(url: str, module: nn.Module, prefix: str = "model.") -> None:
    """Load one module's weights from a training checkpoint (strict), e.g. prefix 'model.target.encoder.'."""
    sd, _ = get_state_dict(module, [], options=StateDictOptions(strict=True))
    wanted = {f"model.{prefix.removeprefix('model.')}{k}": v for k, v in sd.items()}
    load(url, wanted)
    strip = len(f"model.{prefix.removeprefix('model.')}")
    set_state_dict(module, [], model_state_dict={k[strip:]: v for k, v in wanted.items()}, optim_state_dict={})
