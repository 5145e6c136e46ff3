"""One finetuning or linear-probe step of a stage configuration under fake tensors and a fake process group: memory
per rank by kind, the peak, and FLOPs, as `extrema.check.estimate` does for pretraining.

The model is the stage's own (`new_classifier` for finetuning, `frozen_encoder` and `probe_head` for the probe) on
the meta device, then given fake storage; its optimizer is the stage's own (`finetune_optimizer`: AdamW with
layer-wise lr decay; `probe_optimizer`: LARS or SGD over the head only) after one step that creates its state, and
the measured step is the stage's own `train_step`. A finetuning batch is measured as it reaches `train_step`: mixed
images and soft labels (MixUp and CutMix draw their mix from the data, which fake tensors do not hold). Over several
ranks these stages run DDP, whose reducer cannot run on fake tensors: the step is the unwrapped one plus DDP's
gradient buckets (a second copy of the trained gradients); a GPU job's SyncBatchNorm of the probe's head is counted
as the BatchNorm it replaces (the same statistics).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensorMode

from extrema.check.estimate import (
    CudaAutocastFp32,
    FrozenAwareMemTracker,
    Setting,
    Target,
    activations,
    fake_storage,
    fake_world,
    flop_counter,
    heading,
    local_bytes,
    per_rank_batch,
    snapshot_bytes,
)
from extrema.data.datasets import SYNTHETIC_CLASSES
from extrema.spec import Experiment
from extrema.stages import finetune, probe
from extrema.train.dist import World

FASHION_MNIST_CLASSES = 10
IMAGENET_CLASSES = 1000  # folders and shards are assumed to be ImageNet-1k, as their training images are
Step = Callable[[], object]
Apply = Callable[[Tensor], bool]


def num_classes(exp: Experiment) -> int:
    """Classes of the dataset's labels (folders and shards: ImageNet-1k's)."""
    if exp.data.dataset == "synthetic":
        return SYNTHETIC_CLASSES
    if exp.data.dataset == "fashion_mnist":
        return FASHION_MNIST_CLASSES
    return IMAGENET_CLASSES


def applies(optimizer: torch.optim.Optimizer, params: list[Tensor], clip_grad: float | None) -> Apply:
    """What the stage's `StepEnd.optimizer_step` does after the backward pass, every step allowed: clip the
    gradients when asked, step the optimizer, zero the gradients."""

    def apply(loss: Tensor) -> bool:
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(params, clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    return apply


def first_step(trained: list[Tensor], optimizer: torch.optim.Optimizer) -> None:
    """One optimizer step on zero gradients: its state exists, as at every step after the first."""
    for q in trained:
        q.grad = torch.zeros_like(q)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def learnable_pos_embed(model: finetune.Classifier) -> None:
    """The encoder's position table made a trained parameter, as `weights.use_pos_embed` makes it (learnable)."""
    table: Tensor = model.encoder.pos_embed  # type: ignore[assignment]
    delattr(model.encoder, "pos_embed")
    model.encoder.pos_embed = nn.Parameter(table)  # type: ignore[assignment]


def finetune_parts(
    exp: Experiment, world: World, setting: Setting, fake: FakeTensorMode, batch: int
) -> tuple[list[nn.Module], torch.optim.Optimizer, tuple[Tensor, ...], Step]:
    """The classifier and its optimizer with fake storage, a mixed batch, and the stage's step over them."""
    f = exp.finetune
    classes = num_classes(exp)
    with torch.device("meta"):
        model = finetune.new_classifier(exp, f, classes)
    if f.pos_embed == "learnable":
        learnable_pos_embed(model)
    model = fake_storage(model, fake, world.device)
    size = model.encoder.img_size
    with fake:
        optimizer = finetune.finetune_optimizer(model, f)
        first_step([q for q in model.parameters() if q.requires_grad], optimizer)
        x, soft = torch.zeros(batch, exp.model.in_chans, size, size), torch.full((batch, classes), 1 / classes)
    apply = applies(optimizer, list(model.parameters()), f.clip_grad)
    model.train()
    return (
        [model],
        optimizer,
        (x, soft),
        functools.partial(finetune.train_step, model, x, soft, f, world, setting.amp, apply),
    )


def probe_parts(
    exp: Experiment, world: World, setting: Setting, fake: FakeTensorMode, batch: int
) -> tuple[list[nn.Module], torch.optim.Optimizer, tuple[Tensor, ...], Step]:
    """The frozen encoder, the head and its optimizer with fake storage, a batch, and the stage's step over them."""
    p = exp.probe
    with torch.device("meta"):
        encoder = probe.frozen_encoder(exp, p, None)
        head = probe.probe_head(encoder.embed_dim, num_classes(exp), p)
    encoder, head = fake_storage(encoder, fake, world.device), fake_storage(head, fake, world.device)
    size = exp.model.resolved_img_size
    with fake:
        optimizer = probe.probe_optimizer(head, p)
        first_step(list(head.parameters()), optimizer)
        x, y = torch.zeros(batch, exp.model.in_chans, size, size), torch.zeros(batch, dtype=torch.long)
    apply = applies(optimizer, list(head.parameters()), None)
    head.train()
    step = functools.partial(probe.train_step, encoder, head, x, y, p, world, setting.amp, apply)
    return [encoder, head], optimizer, (x, y), step


PARTS = {"finetune": finetune_parts, "probe": probe_parts}


def estimate_downstream(
    exp: Experiment, stage: str, nodes: int, processes_per_node: int, target: Target, rank: int = 0
) -> dict[str, Any]:
    """Memory of one steady `stage` step (finetune or probe) per rank, by kind and at the peak, and its FLOPs, at
    the job's world size. Call in a fresh process: it joins a fake process group as `rank`."""
    world_size = nodes * processes_per_node
    os.environ["LOCAL_WORLD_SIZE"] = str(processes_per_node)
    world = fake_world(world_size, rank)
    setting = Setting.of(exp, target, stage=stage)
    batch = per_rank_batch(exp, world_size, stage)
    fake = FakeTensorMode()
    modules, optimizer, inputs, step = PARTS[stage](exp, world, setting, fake, batch)
    strategy, micro = "ddp" if world_size > 1 else "none", batch // getattr(exp, stage).accum_steps
    result = heading(stage, world, strategy, target, setting.amp, batch, micro)
    with fake:
        result.update(measure(modules, optimizer, inputs, step, setting, world))
    return result


def emulated(setting: Setting) -> contextlib.AbstractContextManager[object]:
    """CUDA autocast's fp32 functions followed where the target is a GPU with autocast, else nothing."""
    return CudaAutocastFp32() if setting.cuda_autocast else contextlib.nullcontext()


def measure(
    modules: list[nn.Module],
    optimizer: torch.optim.Optimizer,
    inputs: tuple[Tensor, ...],
    step: Step,
    setting: Setting,
    world: World,
) -> dict[str, Any]:
    """The step under a memory tracker, then again under a FLOP counter (call under the fake mode): bytes per rank
    by kind (the parameters, frozen ones included; gradients and optimizer state of the trained ones), the peak,
    FLOPs. Two steps: under torch's FLOP counter a checkpointed block's activations stay alive (measured: a
    checkpointed backbone's peak 2.3x its own), so the counter must not watch the step the memory is taken of."""
    tracker = FrozenAwareMemTracker()
    tracker.track_external(*modules, optimizer, *inputs)
    with tracker, emulated(setting):
        step()
    flops = flop_counter()
    with flops, emulated(setting):
        step()
    peak = snapshot_bytes(tracker, "peak")
    params = [q for m in modules for q in m.parameters()]
    trained = local_bytes(q for q in params if q.requires_grad)
    buckets = trained if world.size > 1 else 0
    state = (v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return {
        "memory": {
            "parameters": local_bytes(iter(params)),
            "gradients": trained + buckets,
            "optimizer": local_bytes(state),
            "activations": activations(peak),
            "peak": peak["Total"] + buckets,
        },
        "at_peak": peak,
        "flops_per_rank": int(flops.get_total_flops()),
        "flops_per_step": int(flops.get_total_flops()) * world.size,
    }
