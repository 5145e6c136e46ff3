"""ExtreMA pretraining: a masked online ViT regresses the EMA target's projection of the full view.

    python -m extrema.entry <run-dir> pretrain                     # one process
    torchrun --nproc_per_node=8 -m extrema.entry <run-dir> pretrain  # FSDP2 (or DDP) over 8 processes

Reads top to bottom: data, model, sharding, optimizer, resume, loop (schedules -> EMA update -> loss -> step),
kNN monitor, checkpoints, preemption, export, result. Resuming is not a mode: the stage continues from its
latest complete checkpoint if there is one.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from extrema.data import datasets, loaders, transforms
from extrema.data.augment import two_views
from extrema.eval.knn_monitor import knn_monitor, pixel_knn
from extrema.models.extrema import ExtreMA, Sampling, random_masks
from extrema.run import rundir
from extrema.run.attempt import BARE, Attempt
from extrema.spec import Experiment, PretrainSpec, RunSpec
from extrema.train import ckpt, resume_point, weights
from extrema.train.dist import Preemption, World, autocast_dtype, gather_keys, gradient_sync, init_world, wrap
from extrema.train.optim import build_adamw, cosine_schedule, ema_momentum, param_groups, scaled_lr, set_hyperparams
from extrema.train.step_end import UNSET, Cadence, LoopState, StepEnd

KNN_START = ("init_top1", "init_top5", "pixels_top1", "pixels_top5")  # kept across restarts for the result


def color_on_device(exp: Experiment, device: torch.device) -> bool:
    """Whether colour augmentation runs batched on the training device (auto: on GPU)."""
    auto = device.type == "cuda"
    return auto if exp.data.color_on_device is None else exp.data.color_on_device


class SampleMasks:
    """Picklable per-sample mask draw: (M, K) visible indices of one image from its own generator."""

    def __init__(self, num_patches: int, num_masks: int, ratio: float, sampling: Sampling) -> None:
        self.args = (num_patches, num_masks, ratio, sampling)

    def __call__(self, g: torch.Generator) -> torch.Tensor:
        n, m, r, s = self.args
        return random_masks(1, n, m, r, s, generator=g)[:, 0]


def make_views(exp: Experiment, train_set: datasets.LabeledImages, device_color: bool) -> loaders.PretrainViews:
    """Two views per image plus the image's own masks, all seeded per sample."""
    m = exp.pretrain.masking
    mask_fn = SampleMasks(exp.model.num_patches, m.num_masks, m.ratio, m.sampling)
    transform = transforms.TwoViewTransform(
        exp.model.resolved_img_size, exp.data.augmentation, exp.data.crop_min, device_color=device_color
    )
    return loaders.PretrainViews(train_set, transform, exp.pretrain.seed, mask_fn)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    p: PretrainSpec,
    world: World,
    amp: torch.dtype | None,
    device_color: bool,
    color: bool,
    allow: Callable[[torch.Tensor], bool] = lambda loss: True,
) -> torch.Tensor:
    """One optimizer step over `accum_steps` micro-batches; returns the mean loss as a device tensor (no sync).
    `allow(loss)` decides whether the gradients are applied (StepEnd.update_allowed); a skipped step returns 0."""
    x1, x2, masks = (t.to(world.device, non_blocking=True) for t in batch)
    if device_color:
        x1, x2 = two_views(x1, x2, color)
    visible = masks.transpose(0, 1)  # (B, M, K) from the loader -> (M, B, K), mask-major
    total = torch.zeros((), device=world.device)
    chunks = list(zip(x1.chunk(p.accum_steps), x2.chunk(p.accum_steps), visible.chunk(p.accum_steps, dim=1)))
    for i, (c1, c2, cv) in enumerate(chunks):
        with gradient_sync(model, sync=i == len(chunks) - 1):
            with torch.autocast(world.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss = model(c1, c2, cv, p.loss, p.temperature, p.symmetric, gather_keys)
            (loss / p.accum_steps).backward()
        total += loss.detach() / p.accum_steps
    if p.clip_grad is not None:
        nn.utils.clip_grad_norm_([q for q in model.parameters() if q.grad is not None], p.clip_grad)
    applied = allow(total)
    if applied:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total if applied else torch.zeros_like(total)


COMPILE_BACKEND_ENV = "EXTREMA_COMPILE_BACKEND"  # torch.compile's backend (inductor unless set; tests use aot_eager)


def compile_blocks(model: ExtreMA) -> None:
    """torch.compile every transformer block of both branches in place, before any sharding: FSDP2's hooks then stay
    outside the compiled regions (a whole model compiled after sharding breaks its graph at every sharded block).
    Blocks of one kind share their compiled code; parameter names are unchanged."""
    backend = os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
    for branch in (model.online, model.target):
        for block in [*branch.encoder.blocks, *branch.encoder.blocks_token]:
            block.compile(backend=backend)


def export_encoders(model: ExtreMA, stage_dir: str, world: World) -> None:
    """Write the student and EMA encoders as plain full state dicts (`export/encoder_{student,ema}.pt`)."""
    for name, encoder in (("student", model.online.encoder), ("ema", model.target.encoder)):
        state = ckpt.full_state_dict(encoder)
        if world.is_main:
            ckpt.write_torch(rundir.join(stage_dir, "export", f"encoder_{name}.pt"), state)


InitFromMode = Literal["weights", "resume"]


def run(
    spec: RunSpec, stage_dir: str, attempt: Attempt = BARE, init_from_mode: InitFromMode | None = None
) -> dict[str, Any]:
    """Pretrain, monitor with kNN, checkpoint, and return the final metrics. `attempt` (the job entry's) fences the
    checkpoints and receives the metrics.

    `init_from_mode` (the spec's `pretrain.init_from_mode` when None): `weights` starts from `init_from`'s weights
    with a fresh optimizer at step 0; `resume` also takes its optimizer state and its step (an official
    checkpoint's epoch), so the schedules and the EMA momentum continue where it stopped.
    """
    exp, p = spec.experiment, spec.experiment.pretrain
    mode = init_from_mode if init_from_mode is not None else p.init_from_mode
    if mode == "resume" and not p.init_from:
        raise ValueError("pretrain.init_from_mode resume needs pretrain.init_from")
    world = init_world()
    torch.manual_seed(p.seed)  # identical initial weights on every rank
    amp = autocast_dtype(p.precision, world.device)

    train_set = datasets.build_dataset(exp.data, "train", seed=p.seed)
    steps_per_epoch = exp.steps_per_epoch(len(train_set))
    total_steps = exp.total_steps(len(train_set))
    warmup_steps = p.warmup_epochs * steps_per_epoch
    knn_every = math.ceil(p.knn_every_epochs * steps_per_epoch) if p.knn_every_epochs else None

    model = ExtreMA(exp.model)
    if p.init_from:  # every part of the model, both branches; a resumed run's checkpoint replaces them below
        weights.load_extrema(model, p.init_from)
    model = model.to(world.device)
    if p.compile:
        compile_blocks(model)
    loss_module, core = wrap(model, world, p.strategy, bf16=world.device.type == "cuda" and amp is not None)
    trainable = nn.ModuleDict({"online": core.online, "predictor": core.predictor})
    groups = param_groups(trainable, p.weight_decay, no_decay_names=("pos_embed", "cls_token"))
    optimizer = build_adamw(groups, lr=scaled_lr(p.base_lr, p.batch_size), betas=p.betas)

    def evaluate_knn() -> dict[str, float]:
        encoder = core.target.encoder if exp.knn.encoder == "ema" else core.online.encoder
        return {f"knn_{k}": v for k, v in knn_monitor(encoder, exp, world, amp).items()}

    step_end = StepEnd(
        world=world,
        stage_dir=stage_dir,
        module=core,
        optimizer=optimizer,
        loop=LoopState(values=KNN_START, rng=world),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        cadence=Cadence(
            log_every=p.log_every,
            eval_every=knn_every,
            ckpt_every=p.ckpt_every,
            epochs=False,
            eval_last=False,
            log_evaluations=False,
            keep_last=p.keep_last,
            keep_every=p.keep_every,
            background=p.async_save,
        ),
        evaluate=evaluate_knn if knn_every and p.knn_monitor else None,
        on_nonfinite=p.on_nonfinite,
        max_skipped_steps=p.max_skipped_steps,
        attempt=attempt,
    )
    torch.manual_seed(p.seed + world.rank)  # drop path differs by rank (a resumed run restores each rank's state)
    start_step = step_end.resume()
    resumed: resume_point.ResumePoint | None = None
    if start_step == 0 and p.init_from and mode == "resume":  # this stage's own checkpoint, when it has one, wins
        resumed = resume_point.resume_from(
            p.init_from, core, optimizer, steps_per_epoch, total_steps, base_momentum=p.ema_momentum
        )
        start_step = step_end.loop.step = resumed.step
    start = step_end.loop.values
    if start_step == 0 and p.knn_monitor:
        initial = evaluate_knn()
        step_end.log({"step": 0, "total_steps": total_steps, "epoch": 0.0, **initial})
        start.update({f"init_{k.removeprefix('knn_')}": v for k, v in initial.items()})
        start.update({f"pixels_{k}": v for k, v in pixel_knn(exp, world).items()})

    device_color = color_on_device(exp, world.device)
    color = exp.data.augmentation == "spatial_consistent_color"
    views = make_views(exp, train_set, device_color)
    loader = loaders.step_batches(views, p.batch_size, p.seed, start_step, total_steps, world, exp.data.num_workers)

    model.train()
    running = torch.zeros((), device=world.device)
    t0 = time.perf_counter()
    with Preemption() as preemption:
        for step, batch in enumerate(loader, start=start_step):
            lr = cosine_schedule(step, total_steps, scaled_lr(p.base_lr, p.batch_size), p.min_lr, warmup_steps)
            wd = p.weight_decay
            if p.weight_decay_end is not None:
                wd = cosine_schedule(step, total_steps, p.weight_decay, p.weight_decay_end)
            momentum = ema_momentum(step, total_steps, p.ema_momentum)
            set_hyperparams(optimizer, lr, wd)
            core.update_target(momentum)
            allow = functools.partial(step_end.update_allowed, step + 1, parameters=core.parameters())
            running += train_step(loss_module, optimizer, batch, p, world, amp, device_color, color, allow)
            speed = (step + 1 - start_step) * p.batch_size / max(time.perf_counter() - t0, 1e-9)
            step_end(step + 1, running, preemption, lr=lr, wd=wd, momentum=momentum, images_per_s=speed)
    steps = step_end.loop.step

    export_encoders(core, stage_dir, world)
    result: dict[str, Any] = {**step_end.progress(), "total_steps": total_steps}
    if p.knn_monitor:
        final = evaluate_knn()
        step_end.log({"step": steps, "total_steps": total_steps, "epoch": steps / steps_per_epoch, **final})
        result.update(final)
        result.update({f"knn_{k}": v for k, v in step_end.loop.given(*KNN_START).items()})
        if start["init_top1"] != UNSET:
            result["knn_gain_top1"] = final["knn_top1"] - start["init_top1"]
    losses = [r["loss"] for r in step_end.metrics.records if "loss" in r]
    if losses:
        result["loss_final"] = losses[-1]
    if resumed is not None:
        result["init_from_step"] = resumed.step
    result["world_size"] = world.size
    return result
