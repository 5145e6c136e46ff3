"""The CPU allocator's peak over one steady pretraining, finetuning, probe or detect step, or the knn stage's moments,
built and run as the stage does (tests/test_check.py's measurement, in a module of its own so that the gloo ranks it
spawns import little)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch._C._profiler import _EventType
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import OpTree

from extrema.check.detect import caps, data_bounds, image_sizes
from extrema.check.downstream import applies, num_classes
from extrema.eval.knn_monitor import extract, gather_bank
from extrema.eval.neighbors import knn_hits
from extrema.models.extrema import ExtreMA, random_masks
from extrema.models.vit import build_vit
from extrema.spec import Experiment
from extrema.stages import finetune, probe
from extrema.stages.detect import LOSSES, build_model, detect_optimizer
from extrema.stages.finetune import build_classifier, finetune_optimizer
from extrema.stages.inpaint import EVAL_BATCH, build_decoder, evaluate, mean_image, train
from extrema.stages.knn import knn_encoder
from extrema.stages.locality import head_maps
from extrema.stages.pretrain import train_step
from extrema.stages.probe import frozen_encoder, probe_head, probe_optimizer
from extrema.train.dist import World, wrap
from extrema.train.optim import build_adamw, param_groups, scaled_lr
from tests.processes import end_world


def live_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind these tensors (a DTensor's local shard)."""
    storages: dict[int, int] = {}
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        storages[local.untyped_storage().data_ptr()] = local.untyped_storage().nbytes()
    return sum(storages.values())


def measured_peak(exp: Experiment, world: World) -> int:
    """A real CPU step as the stage runs it (after a first step, so the optimizer's state exists): the bytes
    alive before it plus the highest sum of the CPU allocator's allocations and frees the profiler saw in it."""
    p = exp.pretrain
    torch.manual_seed(0)
    model = ExtreMA(exp.model)
    loss_module, core = wrap(model, world, p.strategy, bf16=False)
    trainable = nn.ModuleDict({"online": core.online, "predictor": core.predictor})
    groups = param_groups(trainable, p.weight_decay, no_decay_names=("pos_embed", "cls_token"))
    optimizer = build_adamw(groups, lr=scaled_lr(p.base_lr, p.batch_size), betas=p.betas)
    b, size, m = p.batch_size // world.size, exp.model.resolved_img_size, p.masking
    views = torch.randn(b, 3, size, size), torch.randn(b, 3, size, size)
    batch = (*views, random_masks(b, exp.model.num_patches, m.num_masks, m.ratio).transpose(0, 1).contiguous())
    model.train()
    core.update_target(p.ema_momentum)
    train_step(loss_module, optimizer, batch, p, world, None, False, True)  # makes the optimizer's state
    before = live_bytes([*core.parameters(), *core.buffers(), *optimizer_state(optimizer), *batch])

    def step() -> None:
        core.update_target(p.ema_momentum)
        train_step(loss_module, optimizer, batch, p, world, None, False, True)

    return before + allocator_peak(step)


def allocator_peak(step: Callable[[], object]) -> int:
    """The highest sum of the CPU allocator's allocations and frees the profiler sees while `step` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = OpTree(prof.profiler.kineto_results).sorted_nodes
    allocations = sorted(
        (e.start_time_ns, e.typed[1].alloc_size) for e in events if e.typed[0] == _EventType.Allocation
    )
    now = top = 0
    for _, size_change in allocations:
        now += size_change
        top = max(top, now)
    return top


def optimizer_state(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's state tensors."""
    return [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]


def measured_finetune_peak(exp: Experiment, world: World) -> int:
    """A real CPU finetuning step of one rank as the stage runs it, on mixed images and soft labels, after a first
    step: the bytes alive before it plus the allocator's peak in it."""
    f, classes = exp.finetune, num_classes(exp)
    model = build_classifier(exp, f, classes, None)
    optimizer = finetune_optimizer(model, f)
    b, size = f.batch_size // world.size, model.encoder.img_size
    x, soft = torch.randn(b, exp.model.in_chans, size, size), torch.softmax(torch.randn(b, classes), dim=1)
    apply = applies(optimizer, list(model.parameters()), f.clip_grad)
    model.train()
    finetune.train_step(model, x, soft, f, world, None, apply)
    before = live_bytes([*model.parameters(), *model.buffers(), *optimizer_state(optimizer), x, soft])
    return before + allocator_peak(lambda: finetune.train_step(model, x, soft, f, world, None, apply))


def measured_probe_peak(exp: Experiment, world: World) -> int:
    """A real CPU linear-probe step of one rank as the stage runs it, after a first step: the bytes alive before
    it plus the allocator's peak in it."""
    p = exp.probe
    encoder = frozen_encoder(exp, p, None)
    head = probe_head(encoder.embed_dim, num_classes(exp), p)
    optimizer = probe_optimizer(head, p)
    b, size = p.batch_size // world.size, exp.model.resolved_img_size
    x, y = torch.randn(b, exp.model.in_chans, size, size), torch.randint(num_classes(exp), (b,))
    apply = applies(optimizer, list(head.parameters()), None)
    head.train()
    probe.train_step(encoder, head, x, y, p, world, None, apply)
    modules = [*encoder.parameters(), *encoder.buffers(), *head.parameters(), *head.buffers()]
    before = live_bytes([*modules, *optimizer_state(optimizer), x, y])
    return before + allocator_peak(lambda: probe.train_step(encoder, head, x, y, p, world, None, apply))


def canvas_target(height: int, width: int, boxes: list[list[float]]) -> dict[str, torch.Tensor]:
    """A detection target of these boxes (x0, y0, x1, y1), each object's mask its box, labels 1."""
    masks = torch.zeros(len(boxes), height, width, dtype=torch.uint8)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes):
        mask[int(y0) : int(y1), int(x0) : int(x1)] = 1
    return {"boxes": torch.tensor(boxes), "labels": torch.ones(len(boxes), dtype=torch.int64), "masks": masks}


def measured_detect_peak(exp: Experiment, boxes: list[list[float]]) -> tuple[int, dict[str, list[int]]]:
    """A real CPU detect step of one rank as the stage runs it (Mask R-CNN's losses summed, backward, AdamW over
    the layer-decayed groups) on images at the check's bound with these objects, after a first step: the bytes
    alive before it plus the allocator's peak in it, and the proposals, box RoIs and mask RoIs per image it used."""
    d = exp.detect
    classes, _, aspect = data_bounds(d)
    torch.manual_seed(0)
    model = build_model(exp, d, classes, None, None)
    c = caps(d, model, d.batch_size, len(boxes), aspect)
    optimizer = detect_optimizer(model, d)
    apply = applies(optimizer, list(model.parameters()), d.clip_grad)
    images = [torch.rand(exp.model.in_chans, h, w) for h, w in image_sizes(c)]
    targets = [canvas_target(h, w, boxes) for h, w in image_sizes(c)]
    seen: dict[str, list[int]] = {}
    heads = model.roi_heads
    model.rpn.register_forward_hook(lambda m, i, o: seen.update(proposals=[len(p) for p in o[0]]))
    heads.box_roi_pool.register_forward_hook(lambda m, i, o: seen.update(rois=[len(p) for p in i[1]]))
    heads.mask_roi_pool.register_forward_hook(lambda m, i, o: seen.update(mask_rois=[len(p) for p in i[1]]))
    model.train()

    def step() -> None:
        losses = model(images, targets)
        loss = sum(losses[k] for k in LOSSES)
        loss.backward()  # type: ignore[union-attr]
        apply(loss)  # type: ignore[arg-type]

    step()
    held = [*model.parameters(), *model.buffers(), *optimizer_state(optimizer), *images]
    before = live_bytes(held + [t for target in targets for t in target.values()])
    return before + allocator_peak(step), seen


def measured_inpaint_peaks(exp: Experiment) -> dict[str, int]:
    """The inpainting stage's own training (one step, its optimizer made afresh as the stage makes it) and its
    evaluation of one batch of held-out images at its smallest ratio, on the CPU: for each, the bytes alive
    before it plus the allocator's peak in it."""
    s = exp.inpaint.model_copy(update={"steps": 1, "warmup_steps": 0, "ratios": (min(exp.inpaint.ratios),)})
    torch.manual_seed(0)
    encoder = build_vit(exp.model, drop_path_rate=0.0).requires_grad_(False).eval()
    decoder = build_decoder(encoder, s)
    size = exp.model.resolved_img_size
    images = torch.randint(0, 256, (s.batch_size, exp.model.in_chans, size, size), dtype=torch.uint8)
    shape = (min(EVAL_BATCH, s.val_size or EVAL_BATCH), exp.model.in_chans, size, size)
    held_out = torch.randint(0, 256, shape, dtype=torch.uint8)
    mean = mean_image(images, encoder.patch_size)
    train(encoder, decoder, images, s, None)
    held = live_bytes([*encoder.parameters(), *decoder.parameters(), *decoder.buffers(), mean])
    training = held + live_bytes([images]) + allocator_peak(lambda: train(encoder, decoder, images, s, None))
    evaluation = (
        held
        + live_bytes([held_out])
        + allocator_peak(lambda: evaluate(encoder, decoder, held_out, mean, s.ratios[0], s.seed, None))
    )
    return {"training step": training, "evaluation batch": evaluation}


def measured_locality_peak(exp: Experiment) -> int:
    """The locality stage's class-token attention over one batch on the CPU: the bytes alive before it (the
    encoder, the uint8 batch) plus the allocator's peak in it."""
    s = exp.locality
    encoder = build_vit(exp.model, drop_path_rate=0.0).requires_grad_(False).eval()
    size = s.img_size or exp.model.resolved_img_size
    images = torch.randint(0, 256, (s.batch_size, exp.model.in_chans, size, size), dtype=torch.uint8)
    head_maps(encoder, images)
    return live_bytes([*encoder.parameters(), *encoder.buffers(), images]) + allocator_peak(
        lambda: head_maps(encoder, images)
    )


def measure_rank(rank: int, port: int, spec: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    exp = Experiment.model_validate_json(Path(spec).read_text())
    peak = measured_peak(exp, World(rank, 2, rank, torch.device("cpu")))
    Path(f"{out}.{rank}").write_text(str(peak))
    end_world()


def measured_knn_peaks(exp: Experiment, bank_rows: int, query_rows: int) -> dict[str, int]:
    """The knn stage on one CPU rank as it runs, each moment after the tensors it finds alive: a forward pass of
    one batch with the gathered bank and the queries held, the gather of the bank, the search of the queries."""
    k, classes = exp.knn, num_classes(exp)
    encoder = knn_encoder(exp).requires_grad_(False).eval()
    dim = encoder.embed_dim
    size = exp.model.resolved_img_size
    x, y = torch.randn(k.batch_size, exp.model.in_chans, size, size), torch.randint(classes, (k.batch_size,))
    feats, labels = torch.randn(bank_rows, dim), torch.randint(classes, (bank_rows,))
    model = [*encoder.parameters(), *encoder.buffers()]
    gathered = allocator_peak(lambda: gather_bank(feats, labels))
    bank, bank_y = gather_bank(feats, labels)
    queries, query_y = torch.randn(query_rows, dim), torch.randint(classes, (query_rows,))
    held = [*model, bank, bank_y, queries, query_y]
    forward = allocator_peak(lambda: extract(encoder, [(x, y)], k.feature, torch.device("cpu")))
    search = allocator_peak(lambda: knn_hits(bank, bank_y, queries, query_y, classes, k.k, k.temperature))
    return {
        "forward": live_bytes([*held, x, y]) + forward,
        "search": live_bytes(held) + search,
        "gather": live_bytes([*model, feats, labels]) + gathered,
    }
