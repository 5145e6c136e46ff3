"""ExtreMA pretraining: a masked online ViT regresses the EMA target's projection of the full view.

    python -m extrema.entry <run-dir> pretrain                     # one process
    torchrun --nproc_per_node=8 -m extrema.entry <run-dir> pretrain  # FSDP2 (or DDP) over 8 processes

Reads top to bottom: data, model, sharding, optimizer, resume, loop (schedules -> EMA update -> loss -> step),
kNN monitor, checkpoints, preemption, export, result. Resuming is not a mode: the stage continues from its
latest complete checkpoint if there is one.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

import torch
from torch import nn

from extrema import ckpt, data, rundir
from extrema.augment import two_views
from extrema.dist import PREEMPT_CHECK_EVERY, Preemption, World, all_reduce_mean, gather_keys, init_world, wrap
from extrema.entry import Preempted
from extrema.models.extrema import ExtreMA, Sampling, random_masks
from extrema.optim import build_adamw, cosine_schedule, ema_momentum, param_groups, scaled_lr, set_hyperparams
from extrema.spec import Experiment, PretrainSpec, RunSpec
from extrema.stages.knn import knn_monitor, pixel_knn


def autocast_dtype(p: PretrainSpec, device: torch.device) -> torch.dtype | None:
    """bf16 on GPU (and on CPU when asked), None for fp32."""
    if p.precision == "bf16" or (p.precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


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


def make_views(exp: Experiment, train_set: data.LabeledImages, device_color: bool) -> data.PretrainViews:
    """Two views per image plus the image's own masks, all seeded per sample."""
    m = exp.pretrain.masking
    mask_fn = SampleMasks(exp.model.num_patches, m.num_masks, m.ratio, m.sampling)
    transform = data.TwoViewTransform(
        exp.model.resolved_img_size, exp.data.augmentation, exp.data.crop_min, device_color=device_color
    )
    return data.PretrainViews(train_set, transform, exp.pretrain.seed, mask_fn)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """RNG states the training step consumes (drop path): CPU, and CUDA when used."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def extra_state(step: int, world: World, knn_log: dict[str, float]) -> dict[str, Any]:
    """Non-model checkpoint state; each rank stores its own RNG under its own key.

    DCP fills a loaded state into the keys the caller provides, so the kNN log (whose keys are unknown before
    loading) travels as one JSON string.
    """
    rng = rng_state(world.device)
    return {"step": step, "world_size": world.size, "knn": json.dumps(knn_log), f"rng_rank{world.rank}": rng}


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    p: PretrainSpec,
    world: World,
    amp: torch.dtype | None,
    device_color: bool,
    color: bool,
) -> torch.Tensor:
    """One optimizer step over `accum_steps` micro-batches; returns the mean loss as a device tensor (no sync)."""
    x1, x2, masks = (t.to(world.device, non_blocking=True) for t in batch)
    if device_color:
        x1, x2 = two_views(x1, x2, color)
    visible = masks.transpose(0, 1)  # (B, M, K) from the loader -> (M, B, K), mask-major
    total = torch.zeros((), device=world.device)
    for c1, c2, cv in zip(x1.chunk(p.accum_steps), x2.chunk(p.accum_steps), visible.chunk(p.accum_steps, dim=1)):
        with torch.autocast(world.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = model(c1, c2, cv, p.loss, p.temperature, p.symmetric, gather_keys)
        (loss / p.accum_steps).backward()
        total += loss.detach() / p.accum_steps
    if p.clip_grad is not None:
        nn.utils.clip_grad_norm_([q for q in model.parameters() if q.grad is not None], p.clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def export_encoders(model: ExtreMA, stage_dir: str, world: World) -> None:
    """Write the student and EMA encoders as plain full state dicts (`export/encoder_{student,ema}.pt`)."""
    for name, encoder in (("student", model.online.encoder), ("ema", model.target.encoder)):
        state = ckpt.full_state_dict(encoder)
        if world.is_main:
            ckpt.write_torch(rundir.join(stage_dir, "export", f"encoder_{name}.pt"), state)


def run(spec: RunSpec, stage_dir: str) -> dict[str, Any]:
    """Pretrain, monitor with kNN, checkpoint, and return the final metrics."""
    exp, p = spec.experiment, spec.experiment.pretrain
    world = init_world()
    torch.manual_seed(p.seed)  # identical initial weights on every rank
    amp = autocast_dtype(p, world.device)

    train_set = data.build_dataset(exp.data, "train", seed=p.seed)
    steps_per_epoch = exp.steps_per_epoch(len(train_set))
    total_steps = exp.total_steps(len(train_set))
    warmup_steps = p.warmup_epochs * steps_per_epoch
    knn_every = math.ceil(p.knn_every_epochs * steps_per_epoch) if p.knn_every_epochs else None

    model = ExtreMA(exp.model).to(world.device)
    loss_module, core = wrap(model, world, p.strategy, bf16=world.device.type == "cuda" and amp is not None)
    if p.compile:
        core.online.encoder.compile()
        core.target.encoder.compile()
    trainable = nn.ModuleDict({"online": core.online, "predictor": core.predictor})
    groups = param_groups(trainable, p.weight_decay, no_decay_names=("pos_embed", "cls_token"))
    optimizer = build_adamw(groups, lr=scaled_lr(p.base_lr, p.batch_size), betas=p.betas)

    ckpt_dir = rundir.join(stage_dir, "ckpt")
    torch.manual_seed(p.seed + world.rank)  # drop path differs by rank
    saved = ckpt.restore(ckpt_dir, core, optimizer, extra_state(0, world, {}))
    start_step = int(saved["step"]) if saved else 0
    if saved and int(saved["world_size"]) == world.size:
        set_rng_state(saved[f"rng_rank{world.rank}"], world.device)
    knn_log: dict[str, float] = json.loads(saved["knn"]) if saved else {}
    metrics = rundir.MetricsLog(rundir.join(stage_dir, "metrics.jsonl"), keep_after_step=start_step)

    def evaluate_knn(step: int) -> dict[str, float]:
        encoder = core.target.encoder if exp.knn.encoder == "ema" else core.online.encoder
        out = knn_monitor(encoder, exp, world, amp)
        if world.is_main:
            metrics.log({"step": step, "epoch": step / steps_per_epoch, **{f"knn_{k}": v for k, v in out.items()}})
            metrics.flush()
        return out

    if start_step == 0 and p.knn_monitor:
        knn_log = {f"init_{k}": v for k, v in evaluate_knn(0).items()}
        knn_log.update({f"pixels_{k}": v for k, v in pixel_knn(exp, world).items()})

    device_color = color_on_device(exp, world.device)
    color = exp.data.augmentation == "spatial_consistent_color"
    views = make_views(exp, train_set, device_color)
    sampler = data.StepBatchSampler(
        len(train_set), p.batch_size, p.seed, start_step, total_steps, world.rank, world.size
    )
    loader = data.step_loader(views, sampler, exp.data.num_workers)

    model.train()
    running = torch.zeros((), device=world.device)
    t0, images_seen, step = time.perf_counter(), 0, start_step
    with Preemption() as preemption:
        for step, batch in enumerate(loader, start=start_step):
            lr = cosine_schedule(step, total_steps, scaled_lr(p.base_lr, p.batch_size), p.min_lr, warmup_steps)
            wd = p.weight_decay
            if p.weight_decay_end is not None:
                wd = cosine_schedule(step, total_steps, p.weight_decay, p.weight_decay_end)
            momentum = ema_momentum(step, total_steps, p.ema_momentum)
            set_hyperparams(optimizer, lr, wd)
            core.update_target(momentum)
            running += train_step(loss_module, optimizer, batch, p, world, amp, device_color, color)
            images_seen += p.batch_size
            done = step + 1
            if done % p.log_every == 0 or done == total_steps:
                n = p.log_every if done % p.log_every == 0 else done % p.log_every
                loss = all_reduce_mean(running).item() / n
                elapsed = time.perf_counter() - t0
                running.zero_()
                if world.is_main:
                    record = {"step": done, "total_steps": total_steps, "epoch": done / steps_per_epoch, "loss": loss}
                    record.update(lr=lr, wd=wd, momentum=momentum, images_per_s=images_seen / max(elapsed, 1e-9))
                    metrics.log(record, flush=True)
            if knn_every and done % knn_every == 0 and done != total_steps:
                evaluate_knn(done)
            last = done == total_steps
            stop = (world.size == 1 or done % PREEMPT_CHECK_EVERY == 0) and preemption.should_stop(world.device)
            if done % p.ckpt_every == 0 or last or stop:
                state = ckpt.training_state(core, optimizer, extra_state(done, world, knn_log))
                ckpt.save(ckpt_dir, done, state, background=p.async_save and not (last or stop))
                ckpt.apply_retention(ckpt_dir, p.keep_last, p.keep_every)
            if stop:
                ckpt.wait_pending()
                raise Preempted(f"preempted at step {done}; checkpoint saved")
    ckpt.wait_pending()
    step = max(step + 1, start_step)

    export_encoders(core, stage_dir, world)
    final = evaluate_knn(step) if p.knn_monitor else {}
    result: dict[str, Any] = {"steps": step, "epochs": step / steps_per_epoch, "total_steps": total_steps}
    result.update({f"knn_{k}": v for k, v in final.items()})
    result.update({f"knn_{k}": v for k, v in knn_log.items()})
    if "top1" in final and "init_top1" in knn_log:
        result["knn_gain_top1"] = final["top1"] - knn_log["init_top1"]
    losses = [r["loss"] for r in metrics.records if "loss" in r]
    if losses:
        result["loss_final"] = losses[-1]
    result["world_size"] = world.size
    return result
