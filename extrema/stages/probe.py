"""Linear probe: BatchNorm (no affine) + Linear on the frozen encoder's instance representation (paper Table 3).

    python -m extrema.entry <run-dir> probe     # reads <run-dir>/probe/spec.json

Reads top to bottom: labelled splits, frozen encoder (the run's pretrain checkpoint, probe.checkpoint, or a
random init for the baseline; strictly loaded), head + LARS, resume, loop (cosine lr -> frozen features in
`accum_steps` micro-batches -> head step), top-1/top-5 on the validation split at every epoch end, checkpoints,
result with its protocol.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from extrema.data import loaders, transforms
from extrema.eval import supervised
from extrema.models.classifier import LinearProbe
from extrema.models.vit import VisionTransformer, build_vit
from extrema.run.attempt import BARE, Attempt
from extrema.spec import Experiment, ProbeSpec, RunSpec
from extrema.train import weights
from extrema.train.dist import Preemption, World, autocast_dtype, data_parallel, init_world
from extrema.train.optim import LARS, cosine_schedule, param_groups, scaled_lr, set_hyperparams
from extrema.train.step_end import accuracy_outcome


def probe_features(encoder: VisionTransformer, x: Tensor, p: ProbeSpec) -> Tensor:
    """The probed feature (B, D): the instance representation or the patch mean, before or after the final norm."""
    instance, patches = encoder.forward_features(x)
    feature = instance if p.feature == "instance" else patches.mean(dim=1)
    return encoder.norm(feature) if p.final_norm else feature


def frozen_encoder(exp: Experiment, p: ProbeSpec, source: str | None) -> VisionTransformer:
    """The encoder to probe, without drop path, strictly loaded from `source` (seeded random init when None)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        encoder = build_vit(exp.model, drop_path_rate=0.0)
    if source is not None:
        weights.load_encoder(encoder, source, p.encoder)
    return encoder.requires_grad_(False).eval()


def probe_head(dim: int, num_classes: int, p: ProbeSpec) -> LinearProbe:
    """The seeded linear head on `dim` features."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p.seed)
        return LinearProbe(dim, num_classes)


def probe_optimizer(head: nn.Module, p: ProbeSpec) -> torch.optim.Optimizer:
    """LARS (or SGD) over the head, starting at the scaled peak lr."""
    groups = param_groups(head, p.weight_decay, no_decay_names=())
    peak_lr = scaled_lr(p.base_lr, p.batch_size)
    if p.optimizer == "lars":
        return LARS(groups, lr=peak_lr, weight_decay=p.weight_decay, momentum=p.momentum)
    return torch.optim.SGD(groups, lr=peak_lr, momentum=p.momentum)


def train_step(
    encoder: VisionTransformer,
    trained: nn.Module,
    x: Tensor,
    y: Tensor,
    p: ProbeSpec,
    world: World,
    amp: torch.dtype | None,
    apply: Callable[[Tensor], bool],
) -> tuple[Tensor, bool]:
    """Frozen features of `x` in `accum_steps` micro-batches (no gradient), the head's cross-entropy on the whole
    batch, its backward, then `apply(loss)` (step, zero the gradients); the loss (no sync) and whether applied."""
    with torch.no_grad(), torch.autocast(world.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        feats = torch.cat([probe_features(encoder, chunk, p) for chunk in x.chunk(p.accum_steps)])
    loss = F.cross_entropy(trained(feats.float()), y)
    loss.backward()
    return loss.detach(), apply(loss.detach())


def run(spec: RunSpec, stage_dir: str, attempt: Attempt = BARE) -> dict[str, Any]:
    """Train a linear probe on frozen features, evaluating each epoch; return last/best accuracy and the protocol.
    `attempt` (the job entry's) fences the checkpoints and receives the metrics."""
    exp, p = spec.experiment, spec.experiment.probe
    world = init_world()
    amp = autocast_dtype(p.precision, world.device)
    img_size = exp.model.resolved_img_size

    splits = supervised.labelled_splits(exp, p)
    steps_per_epoch, total_steps, warmup_steps = supervised.step_counts(
        len(splits.train_idx), p.batch_size, p.epochs, p.warmup_epochs
    )
    peak_lr = scaled_lr(p.base_lr, p.batch_size)

    source = None if p.init == "random" else weights.weights_source(p.checkpoint, stage_dir)
    encoder = frozen_encoder(exp, p, source).to(world.device)
    head, trained = data_parallel(probe_head(encoder.embed_dim, splits.num_classes, p), world)
    optimizer = probe_optimizer(head, p)

    vals = supervised.val_loader(splits, img_size, p.eval_batch_size, world, exp.data.num_workers)

    def predict(x: Tensor) -> Tensor:
        return head(probe_features(encoder, x, p).float())

    steps = (steps_per_epoch, total_steps)
    step_end = supervised.classifier_step_end(
        world, stage_dir, p, head, optimizer, steps, lambda: supervised.evaluate(predict, vals, world, amp), attempt
    )
    start_step = step_end.resume()
    samples = supervised.SeededSamples(splits.train, splits.train_idx, transforms.classify_transform(img_size), p.seed)
    loader = loaders.step_batches(samples, p.batch_size, p.seed, start_step, total_steps, world, exp.data.num_workers)

    head.train()
    running = torch.zeros((), device=world.device)
    with Preemption() as preemption:
        for step, (x, y) in enumerate(loader, start=start_step):
            lr = cosine_schedule(step, total_steps, peak_lr, p.min_lr, warmup_steps)
            set_hyperparams(optimizer, lr)
            x, y = x.to(world.device, non_blocking=True), y.to(world.device, non_blocking=True)
            apply = functools.partial(step_end.optimizer_step, step + 1, parameters=trained.parameters())
            loss, applied = train_step(encoder, trained, x, y, p, world, amp, apply)
            if applied:
                running += loss
            step_end(step + 1, running, preemption, lr=lr)

    return {
        **accuracy_outcome("probe", step_end.loop),
        **step_end.progress(),
        "checkpoint": source,
        "protocol": supervised.protocol(exp, p, splits, world, lr=peak_lr, steps=total_steps, img_size=img_size),
    }
