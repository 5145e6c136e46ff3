"""End-to-end finetuning of the pretrained encoder with a new head (paper Table 2, the BEiT protocol).

    python -m extrema.entry <run-dir> finetune     # reads <run-dir>/finetune/spec.json

Reads top to bottom: labelled splits, classifier (for `cait`: no class token, mean-pooled patch tokens, a new
LayerNorm and head) strictly loaded from the run's pretrain checkpoint (or finetune.checkpoint, or a random init
for the baseline), AdamW with layer-wise lr decay, resume, loop (cosine lr -> MixUp/CutMix -> label-smoothed
cross-entropy over `accum_steps` micro-batches -> step), top-1/top-5 at every epoch end, checkpoints, result.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode, v2

from extrema.data import datasets, loaders, transforms
from extrema.eval import supervised
from extrema.models.classifier import Classifier, discarded_keys, fresh_keys
from extrema.run.attempt import BARE, Attempt
from extrema.spec import Experiment, FinetuneSpec, RunSpec
from extrema.train import weights
from extrema.train.dist import Preemption, World, autocast_dtype, data_parallel, gradient_sync, init_world
from extrema.train.optim import build_adamw, cosine_schedule, param_groups, scaled_lr, set_hyperparams
from extrema.train.step_end import accuracy_outcome


def train_transform(img_size: int, f: FinetuneSpec) -> Callable[[Tensor], Tensor]:
    """RandomResizedCrop (bicubic) + flip + RandAugment on uint8, then normalize and random erasing."""
    ops: list[Callable[..., Any]] = [
        v2.RandomResizedCrop(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
    ]
    if f.randaugment_ops > 0:
        ops.append(v2.RandAugment(num_ops=f.randaugment_ops, magnitude=f.randaugment_magnitude))
    ops.append(transforms.to_normalized())
    if f.random_erasing > 0:
        ops.append(v2.RandomErasing(p=f.random_erasing, value="random"))
    return v2.Compose(ops)


def mix_batch(x: Tensor, y: Tensor, num_classes: int, mixup: float, cutmix: float, seed: int) -> tuple[Tensor, Tensor]:
    """MixUp or CutMix (chosen with equal odds) of a batch -> (images, soft labels (B, C) summing to 1 per row).

    The draw depends on `seed` only. With both alphas 0 the labels are just one-hot.
    """
    choices: list[Callable[..., Any]] = []
    if mixup > 0:
        choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
    if cutmix > 0:
        choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
    if not choices:
        return x, F.one_hot(y, num_classes).to(x.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        mixed, soft = v2.RandomChoice(choices)(x, y)
    return mixed, soft


def new_classifier(exp: Experiment, f: FinetuneSpec, num_classes: int) -> Classifier:
    """The finetuning model at the finetune resolution, seeded, before any weights are loaded."""
    img_size = f.img_size or exp.model.resolved_img_size
    if img_size % exp.model.resolved_patch_size:
        raise ValueError(
            f"finetune.img_size {img_size} is not a multiple of patch size {exp.model.resolved_patch_size}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(f.seed)
        return Classifier(exp.model, num_classes, img_size, f.drop_path_rate)


def build_classifier(exp: Experiment, f: FinetuneSpec, num_classes: int, source: str | None) -> Classifier:
    """The finetuning model at the finetune resolution, strictly loaded from `source` (seeded init when None)."""
    model = new_classifier(exp, f, num_classes)
    learnable = f.pos_embed == "learnable"
    if source is None:
        weights.use_pos_embed(model.encoder, None, learnable=learnable)
    else:
        design = exp.model.cls_token
        weights.load_encoder(
            model.encoder,
            source,
            f.encoder,
            discard=discarded_keys(design),
            fresh=fresh_keys(design),
            learnable_pos=learnable,
        )
    return model


def finetune_optimizer(model: Classifier, f: FinetuneSpec) -> torch.optim.AdamW:
    """AdamW with layer-wise lr decay over the classifier's blocks, starting at the scaled peak lr."""
    groups = param_groups(
        model, f.weight_decay, ("pos_embed", "cls_token"), layer_decay=f.layer_decay, num_layers=model.num_layers
    )
    return build_adamw(groups, lr=scaled_lr(f.base_lr, f.batch_size), betas=f.betas)


def train_step(
    trained: nn.Module,
    x: Tensor,
    soft: Tensor,
    f: FinetuneSpec,
    world: World,
    amp: torch.dtype | None,
    apply: Callable[[Tensor], bool],
) -> tuple[Tensor, bool]:
    """Label-smoothed cross-entropy of mixed images `x` against soft labels over `accum_steps` micro-batches, then
    `apply(loss)` (clip, step, zero the gradients); the mean loss (a device tensor, no sync) and whether applied."""
    chunks = list(zip(x.chunk(f.accum_steps), soft.chunk(f.accum_steps)))
    step_loss = torch.zeros((), device=world.device)
    for i, (cx, cy) in enumerate(chunks):
        with gradient_sync(trained, sync=i == len(chunks) - 1):
            with torch.autocast(world.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss = F.cross_entropy(trained(cx).float(), cy, label_smoothing=f.label_smoothing)
            (loss / len(chunks)).backward()
        step_loss += loss.detach() / len(chunks)
    return step_loss, apply(step_loss)


def run(spec: RunSpec, stage_dir: str, attempt: Attempt = BARE) -> dict[str, Any]:
    """Finetune end to end, evaluating each epoch; return last/best accuracy and the protocol. `attempt` (the job
    entry's) fences the checkpoints and receives the metrics."""
    exp, f = spec.experiment, spec.experiment.finetune
    world = init_world()
    amp = autocast_dtype(f.precision, world.device)

    splits = supervised.labelled_splits(exp, f)
    steps_per_epoch, total_steps, warmup_steps = supervised.step_counts(
        len(splits.train_idx), f.batch_size, f.epochs, f.warmup_epochs
    )
    peak_lr = scaled_lr(f.base_lr, f.batch_size)

    source = None if f.init == "random" else weights.weights_source(f.checkpoint, stage_dir)
    model, trained = data_parallel(build_classifier(exp, f, splits.num_classes, source), world)
    img_size = model.encoder.img_size
    optimizer = finetune_optimizer(model, f)

    vals = supervised.val_loader(splits, img_size, f.eval_batch_size, world, exp.data.num_workers)
    steps = (steps_per_epoch, total_steps)
    step_end = supervised.classifier_step_end(
        world, stage_dir, f, model, optimizer, steps, lambda: supervised.evaluate(model, vals, world, amp), attempt
    )
    start_step = step_end.resume()
    samples = supervised.SeededSamples(splits.train, splits.train_idx, train_transform(img_size, f), f.seed)
    loader = loaders.step_batches(samples, f.batch_size, f.seed, start_step, total_steps, world, exp.data.num_workers)

    model.train()
    running = torch.zeros((), device=world.device)
    with Preemption() as preemption:
        for step, (x, y) in enumerate(loader, start=start_step):
            lr = cosine_schedule(step, total_steps, peak_lr, f.min_lr, warmup_steps)
            set_hyperparams(optimizer, lr)
            # Drop path draws from the global RNG: seed it per step so that a resumed run draws the same.
            torch.manual_seed(datasets.seed_of(f.seed, world.rank, step))
            x, y = x.to(world.device, non_blocking=True), y.to(world.device, non_blocking=True)
            x, soft = mix_batch(
                x, y, splits.num_classes, f.mixup, f.cutmix, datasets.seed_of(f.seed, world.rank, step, 1)
            )
            apply = functools.partial(
                step_end.optimizer_step, step + 1, parameters=model.parameters(), clip_grad=f.clip_grad
            )
            step_loss, applied = train_step(trained, x, soft, f, world, amp, apply)
            if applied:
                running += step_loss
            step_end(step + 1, running, preemption, lr=lr)

    return {
        **accuracy_outcome("finetune", step_end.loop),
        **step_end.progress(),
        "checkpoint": source,
        "protocol": supervised.protocol(exp, f, splits, world, lr=peak_lr, steps=total_steps, img_size=img_size),
    }
