"""Optimizer pieces: pure schedules, parameter groups with layer-wise lr decay, LARS and AdamW construction.

Schedules are pure functions of the (possibly fractional) step; a training loop calls `set_hyperparams` with
their values every iteration, and each group scales the lr by its own "lr_scale".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

# Leading names of ViT parameters that sit before the first block (layer 0 in the BEiT convention).
_EMBED_KEYS = ("patch_embed", "pos_embed", "cls_token", "mask_token")


def cosine_schedule(
    step: int | float,
    total_steps: int,
    base: float,
    final: float = 0.0,
    warmup_steps: int | float = 0,
    warmup_start: float = 0.0,
) -> float:
    """Linear warmup warmup_start -> base over warmup_steps, then half-cycle cosine to final; final past the end."""
    if total_steps < 0 or warmup_steps < 0:
        raise ValueError(f"total_steps ({total_steps}) and warmup_steps ({warmup_steps}) must be >= 0")
    step = max(float(step), 0.0)
    if step < warmup_steps:
        return warmup_start + (base - warmup_start) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return final
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """EMA target momentum m(t) = 1 - (1 - base) * (1 + cos(pi t / T)) / 2: base at t=0, 1.0 at t >= T."""
    if total_steps <= 0 or step >= total_steps:
        return 1.0
    t = max(step, 0)
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * t / total_steps)) / 2.0


def scaled_lr(base_lr: float, batch_size: int) -> float:
    """Linear scaling rule: base_lr * batch_size / 256."""
    return base_lr * batch_size / 256


def vit_layer_id(name: str, num_layers: int) -> int:
    """BEiT layer id of a ViT parameter: embeddings 0, blocks.<i> i+1, everything else num_layers + 1.

    Leading module prefixes ("module.", "encoder.", "backbone.", ...) are skipped up to the first known key.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in _EMBED_KEYS:
            return 0
        if part == "blocks" and i + 1 < len(parts) and parts[i + 1].isdigit():
            block = int(parts[i + 1])
            if block >= num_layers:
                raise ValueError(f"{name}: block index {block} is out of range for num_layers={num_layers}")
            return block + 1
    return num_layers + 1


def _skips_decay(name: str, param: Tensor, no_decay_names: tuple[str, ...]) -> bool:
    """True for 1-D/0-D params and for names matching a no-decay entry (a dotted component or a dotted suffix)."""
    if param.ndim <= 1:
        return True
    parts = name.split(".")
    return any(n in parts or name == n or name.endswith("." + n) for n in no_decay_names)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay_names: Iterable[str] = ("pos_embed", "cls_token"),
    layer_decay: float | None = None,
    num_layers: int | None = None,
    layer_id: Callable[[str], int] | None = None,
) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable params: no weight decay on 1-D params and tokens, optional layer-wise lr decay.

    Each group has "params", "weight_decay", "lr_scale" and "name". Without layer decay the groups are
    ["no_decay", "decay"]; with it they are ordered by layer id, no-decay before decay. Empty groups are dropped.
    """
    if layer_decay is not None and num_layers is None:
        raise ValueError("layer_decay needs num_layers")
    skip = tuple(no_decay_names)
    depth = num_layers or 0
    layer_of = layer_id if layer_id is not None else partial(vit_layer_id, num_layers=depth)

    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not _skips_decay(name, p, skip)
        lid = layer_of(name) if layer_decay is not None else 0
        key = (lid, decay)
        if key not in groups:
            suffix = "decay" if decay else "no_decay"
            groups[key] = {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": 1.0 if layer_decay is None else layer_decay ** (depth + 1 - lid),
                "name": suffix if layer_decay is None else f"layer{lid}_{suffix}",
            }
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def set_hyperparams(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None = None) -> None:
    """Set each group's lr to lr * lr_scale and, on groups that started with weight decay, the weight decay."""
    for group in optimizer.param_groups:
        enabled = group.setdefault("wd_enabled", group.get("weight_decay", 0.0) > 0)
        group["lr"] = lr * group.get("lr_scale", 1.0)
        if weight_decay is not None:
            group["weight_decay"] = weight_decay if enabled else 0.0


class LARS(torch.optim.Optimizer):
    """LARS for linear probing (MAE / MoCo-v3): layer-wise trust ratio and weight decay on params with ndim > 1 only."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ) -> None:
        defaults = {
            "lr": lr,
            "weight_decay": weight_decay,
            "momentum": momentum,
            "trust_coefficient": trust_coefficient,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One LARS step: g += wd*p and g *= tc*|p|/|g| for ndim > 1; mu = momentum*mu + g; p -= lr*mu."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if any(p.grad.is_sparse for p in params):
                raise RuntimeError("LARS does not support sparse gradients")
            updates = [self._adapted(p, group) if p.ndim > 1 else p.grad for p in params]
            mus = [self._momentum_buffer(p) for p in params]
            torch._foreach_mul_(mus, group["momentum"])
            torch._foreach_add_(mus, updates)
            torch._foreach_add_(params, mus, alpha=-group["lr"])
        return loss

    def _adapted(self, p: Tensor, group: dict[str, Any]) -> Tensor:
        """Decayed gradient scaled by the trust ratio tc*|p|/|g| (1 where either norm is 0); p.grad is left intact."""
        g = p.grad.add(p, alpha=group["weight_decay"])  # type: ignore[union-attr]
        p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
        one = torch.ones_like(p_norm)
        q = torch.where(p_norm > 0, torch.where(g_norm > 0, group["trust_coefficient"] * p_norm / g_norm, one), one)
        return g.mul_(q)

    def _momentum_buffer(self, p: Tensor) -> Tensor:
        """The param's momentum buffer "mu", created as zeros on first use."""
        state = self.state[p]
        if "mu" not in state:
            state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        mu: Tensor = state["mu"]
        return mu


FUSED_DEVICES = ("cuda", "cpu")


def build_adamw(
    groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], fused: bool | None = None
) -> torch.optim.AdamW:
    """AdamW over the groups, each starting at lr * lr_scale; fused when every param is a float on CUDA or the CPU
    (on a CPU torch's foreach runs one op per tensor and reads each tensor ~8 times: 96 ms a ViT-S pretraining step
    against 20 fused, AMD EPYC, BENCHMARKS.md issue 32), foreach otherwise."""
    if fused is None:
        fused = all(p.device.type in FUSED_DEVICES and p.is_floating_point() for g in groups for p in g["params"])
    opt_groups = [{"lr": lr * g.get("lr_scale", 1.0), **g} for g in groups]
    return torch.optim.AdamW(opt_groups, lr=lr, betas=betas, fused=fused or None, foreach=None if fused else True)
