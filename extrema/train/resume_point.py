"""Resuming pretraining from another run's checkpoint (`pretrain.init_from` with `init_from_mode: resume`): the
optimizer state and the position in the schedules come across, not only the weights.

An official ExtreMA checkpoint (`main.py`: `{'epoch', 'arch', 'state_dict', 'optimizer', 'scaler'}`) gives its
AdamW state and its epoch; the step is epoch x steps per epoch, and the learning-rate, weight-decay and EMA momentum
schedules, all functions of the step (the release's of the fractional epoch), continue from there. The release's
optimizer state is keyed by position: its parameters in timm's `add_weight_decay` order (no-decay group: 1-D
tensors, biases, `base_encoder.pos_embed` and `base_encoder.cls_token`; then the decay group; each in state-dict
order, frozen ones left out), which this module rebuilds from the state dict and checks against every group size and
tensor shape. The AMP `scaler` is not used here (bf16 or fp32). One of our DCP steps gives its optimizer state and
step as they are.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
    set_state_dict,
)

from extrema.train import ckpt, weights
from extrema.train.optim import ema_momentum

OFFICIAL_TRAINED = ("module.base_encoder.", "module.predictor.")
OFFICIAL_FROZEN = ("module.base_encoder.pos_embed",)  # the fixed sin-cos table: a Parameter without gradient
OFFICIAL_NO_DECAY = ("base_encoder.pos_embed", "base_encoder.cls_token")  # main.py's skip list


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed pretraining starts: the step, the epoch the file gave, and what came across."""

    source: str
    step: int
    epoch: float | None
    optimizer: bool  # whether optimizer state was imported (else AdamW starts fresh)
    momentum: float  # the EMA momentum at that step


def official_order(sd: Mapping[str, Tensor]) -> list[str]:
    """The release's trained parameters in its optimizer's order (timm `add_weight_decay`: no decay, then decay)."""
    trained = [k for k in sd if k.startswith(OFFICIAL_TRAINED) and k not in OFFICIAL_FROZEN]

    def no_decay(k: str) -> bool:
        return sd[k].ndim <= 1 or k.endswith(".bias") or k.removeprefix("module.") in OFFICIAL_NO_DECAY

    return [k for k in trained if no_decay(k)] + [k for k in trained if not no_decay(k)]


def official_optimizer_state(obj: Mapping[str, Any], url: str) -> dict[str, dict[str, Tensor]]:
    """The release's AdamW state per parameter, in our ExtreMA names; ValueError when its layout does not fit."""
    sd, opt = weights.unwrap(obj), obj["optimizer"]
    names = official_order(sd)
    positions = [i for group in opt.get("param_groups", []) for i in group.get("params", [])]
    if len(positions) != len(names):
        raise ValueError(
            f"{url}: its optimizer holds {len(positions)} parameters, the state dict {len(names)} trained ones"
        )
    ours = list(weights.official_to_ours({k: sd[k] for k in names})[0])
    state: dict[str, dict[str, Tensor]] = {}
    wrong: list[str] = []
    for position, name, our in zip(positions, names, ours):
        entry = opt.get("state", {}).get(position)
        if entry is None:  # no step has reached this parameter
            continue
        shapes = {k: tuple(v.shape) for k, v in entry.items() if isinstance(v, Tensor) and v.ndim > 0}
        wrong += [f"{name}.{k} {s} vs {tuple(sd[name].shape)}" for k, s in shapes.items() if s != tuple(sd[name].shape)]
        state[our] = {k: v if k != "step" else torch.as_tensor(float(v), dtype=torch.float32) for k, v in entry.items()}
    if wrong:
        raise ValueError(f"{url}: optimizer state does not fit its parameters: {', '.join(wrong[: weights.SHOWN])}")
    return state


def load_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, dict[str, Any]]) -> None:
    """Replace the optimizer's per-parameter state with `state` (full tensors keyed by `module`'s parameter names)."""
    options = StateDictOptions(full_state_dict=True)
    current: dict[str, Any] = dict(get_optimizer_state_dict(module, optimizer, options=options))
    per_param: dict[str, Any] = dict(current["state"])
    unknown = sorted(set(state) - set(per_param))
    if unknown:
        raise ValueError(f"optimizer state for parameters this model does not train: {', '.join(unknown[:12])}")
    for name, entry in state.items():
        per_param[name] = {k: v.clone() if isinstance(v, Tensor) else v for k, v in entry.items()}
    set_optimizer_state_dict(module, optimizer, {**current, "state": per_param}, options=options)  # type: ignore[arg-type]


def from_official(
    url: str, module: nn.Module, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> tuple[int, float, bool]:
    """(step, epoch, optimizer imported) from an official checkpoint file."""
    if not url.endswith(weights.PTH_SUFFIXES):
        raise ValueError(f"{url}: resuming needs an official .pth or a DCP step (a weights file has no optimizer)")
    obj = weights.read_pth(url)
    if not weights.is_official(weights.unwrap(obj)):
        raise ValueError(f"{url}: not an official ExtreMA checkpoint: resuming needs its optimizer and epoch")
    if not isinstance(obj.get("epoch"), int | float):
        raise ValueError(f"{url}: no 'epoch' to resume at; init_from_mode weights starts from its weights")
    epoch = float(obj["epoch"])
    has_optimizer = isinstance(obj.get("optimizer"), Mapping)
    if has_optimizer:
        load_optimizer_state(module, optimizer, official_optimizer_state(obj, url))
    else:
        print(f"extrema: {url} has no optimizer state; AdamW starts fresh at epoch {epoch:g}", file=sys.stderr)
    return round(epoch * steps_per_epoch), epoch, has_optimizer


def from_dcp(url: str, module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The step of one of our DCP steps, its optimizer state loaded (any world size: DCP reshards)."""
    state = ckpt.training_state(module, optimizer, {"step": 0})
    ckpt.load(url, state)
    set_state_dict(module, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return int(state["extra"]["step"])


def resume_from(
    url: str,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    total_steps: int,
    base_momentum: float,
) -> ResumePoint:
    """Bring an official checkpoint's or a DCP step's optimizer state and position into this run (weights are
    loaded by `weights.load_extrema` before); ValueError when it cannot resume or is already at the end."""
    source = weights.resolve(url)
    if weights.is_file(source):
        step, epoch, imported = from_official(source, module, optimizer, steps_per_epoch)
    else:
        step, epoch, imported = from_dcp(source, module, optimizer), None, True
    if step >= total_steps:
        raise ValueError(f"{source} is at step {step}, not before this run's last ({total_steps}): nothing to resume")
    return ResumePoint(source, step, epoch, imported, ema_momentum(step, total_steps, base_momentum))
