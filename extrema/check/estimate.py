"""One pretraining step of a stage configuration under fake tensors and a fake process group: memory per rank by
kind, the peak, and FLOPs, for the job's world size, without allocating the model.

    python -m extrema.check spec.json --nodes 1 --processes-per-node 8 --gpu-type H100 --json

The model is built as the stage builds it (`ExtreMA(exp.model)`, on the meta device, then given fake storage),
wrapped by the stage's own `extrema.train.dist.wrap` (FSDP2 per block, HSDP, DDP or none) in a world of `fake`
process-group ranks, and stepped by the stage's own `train_step` with its optimizer (`param_groups`,
`build_adamw`) after one step that creates the optimizer's state, so the measured step is a steady one. torch's
memory trackers count every tensor's storage: `FSDPMemTracker` under FSDP2/HSDP, `MemTracker` otherwise.

The target is a GPU (`target="cuda"`: bf16 autocast and FSDP2's bf16 parameters when the stage's precision asks
for them, colour augmentation on the device) or this CPU (`target="cpu"`, what a CPU job runs). Fake tensors live
on the CPU here, because autograd cannot run a backward pass on fake CUDA tensors without a GPU: CPU autocast
follows CUDA's where it differs for this model (`CudaAutocastFp32`: normalisation and softmax run in fp32), and
storages are counted at their size (the CUDA caching allocator's rounding to 512 bytes adds under a megabyte
for these models). DDP's reducer cannot run on fake tensors:
its step is the unwrapped one plus DDP's gradient buckets (a second copy of the gradients).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from extrema.check.plan import plan_checkpoint
from extrema.models import attention
from extrema.models.extrema import ExtreMA
from extrema.spec import Experiment, visible_count
from extrema.stages.pretrain import color_on_device, train_step
from extrema.train.dist import World, autocast_dtype, wrap
from extrema.train.optim import build_adamw, param_groups, scaled_lr

Target = Literal["cuda", "cpu"]
M = TypeVar("M", bound=nn.Module)
Batch = tuple[
    torch.Tensor, torch.Tensor, torch.Tensor
]  # what the loader hands a rank: two views (or crop, colour), masks
# torch.nn.functional calls whose aten ops CUDA autocast runs in fp32 (CPU autocast leaves them in bf16)
CUDA_FP32_FUNCTIONS = (F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.cross_entropy)


def fp32_under_autocast(func: Callable[..., Any]) -> Callable[..., Any]:
    """`func` run in fp32 under CPU autocast (its floating-point inputs cast up, as CUDA autocast casts them, so
    the fp32 copies are what its backward keeps); as it is otherwise."""

    @functools.wraps(func)
    def fp32(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_autocast_enabled("cpu"):
            return func(*args, **kwargs)
        up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        with torch.autocast("cpu", enabled=False):
            return func(*up, **kwargs)

    return fp32


class CudaAutocastFp32(contextlib.AbstractContextManager["CudaAutocastFp32"]):
    """Under CPU autocast, the functions CUDA autocast runs in fp32 run in fp32 too, and attention is the fused kernel
    (`extrema.models.attention`), while active: the functions are swapped in `torch.nn.functional`, which the models
    call them through (a torch-function mode would not reach the recomputation of checkpointed blocks in the
    backward pass, which runs outside every such mode)."""

    def __init__(self) -> None:
        self.replaced: list[tuple[str, Any]] = []
        self.by_products = attention.BF16_ON_CPU_BY_PRODUCTS

    def __enter__(self) -> CudaAutocastFp32:
        for func in CUDA_FP32_FUNCTIONS:
            name = func.__name__
            self.replaced.append((name, getattr(F, name)))  # restored on exit, whatever was there (nested uses)
            setattr(F, name, fp32_under_autocast(func))
        self.by_products = attention.BF16_ON_CPU_BY_PRODUCTS
        attention.BF16_ON_CPU_BY_PRODUCTS = False  # a GPU's attention is the fused kernel
        return self

    def __exit__(self, *exc: object) -> None:
        while self.replaced:
            setattr(F, *self.replaced.pop())
        attention.BF16_ON_CPU_BY_PRODUCTS = self.by_products


def cpu_attention_flops(query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of the CPU's fused attention (torch's counter has the CUDA kernels' formula only): the same formula."""
    return int(sdpa_flop_count(query, key, value))


def cpu_attention_backward_flops(grad: Any, query: Any, key: Any, value: Any, *args: Any, **kwargs: Any) -> int:
    """FLOPs of the CPU's fused attention's backward pass, by the CUDA kernels' formula."""
    return int(sdpa_backward_flop_count(grad, query, key, value))


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, counting the fused attention the fake CPU tensors run as a GPU's would be counted."""
    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_attention_backward_flops,
        },
    )


class WholePeak(MemTracker):
    """A tracker that keeps the whole process's peak only: torch's trackers also keep each module's peak, which
    walks every module at every operation (half of a ViT-B check's time)."""

    def _update_peak_stats(self, peak_state: Any) -> None:
        for device, snapshot in self._curr_mem_snap.items():
            if self._peak_mem.get(device, 0) < snapshot["Total"]:
                self._peak_mem[device] = snapshot["Total"]
                self._peak_mem_snap[device] = dict(snapshot)


class FrozenAwareMemTracker(WholePeak):
    """torch's MemTracker, which otherwise refuses a module with frozen parameters (the EMA target): gradients
    are counted as the backward pass makes them instead of through per-parameter hooks."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True) -> tuple[int, int]:
        return super()._track_module_params_and_buffers(module, install_grad_hooks=False)


class FSDPWholePeak(WholePeak, FSDPMemTracker):
    """torch's FSDPMemTracker (FSDP2's parameters, gradients and collectives by kind), keeping the whole peak."""


@dataclass(frozen=True)
class Setting:
    """How the stage runs on the target: autocast dtype, FSDP2's bf16 parameters, colour on the device, and
    whether CUDA autocast's fp32 functions are to be followed (a GPU target with autocast)."""

    amp: torch.dtype | None
    bf16: bool
    device_color: bool
    cuda_autocast: bool

    @classmethod
    def of(cls, exp: Experiment, target: Target, fake_device: Target = "cpu", stage: str = "pretrain") -> Setting:
        """As the `stage`'s run decides them on a `target` device, its fake tensors on `fake_device`."""
        device = torch.device(target)
        amp = autocast_dtype(getattr(exp, stage).precision, device)
        cuda_amp = target == "cuda" and amp is not None
        return cls(amp, cuda_amp, color_on_device(exp, device), cuda_amp and fake_device == "cpu")


def fake_world(world_size: int, rank: int = 0, device: Target = "cpu") -> World:
    """This process as `rank` of a `fake` process group of `world_size` ranks (collectives do nothing), its
    tensors on `device` (cuda only where a GPU is: autograd runs a CUDA backward on a device thread)."""
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("fake", rank=rank, world_size=world_size, store=FakeStore())
    return World(rank, world_size, 0, torch.device(device))


def heading(
    stage: str, world: World, strategy: str, target: Target, amp: torch.dtype | None, batch: int, micro: int
) -> dict[str, Any]:
    """The fields a stage's result starts with: what was estimated, at which world, rank, wrapping and precision."""
    return {
        "stage": stage,
        "world_size": world.size,
        "rank": world.rank,
        "strategy": strategy,
        "target": target,
        "fake_device": "cpu",
        "precision": "bf16" if amp is not None else "fp32",
        "batch_per_rank": batch,
        "micro_batch": micro,
    }


def fake_extrema(exp: Experiment, fake: FakeTensorMode, device: torch.device) -> ExtreMA:
    """`ExtreMA(exp.model)` as the stage builds it, with fake storage: built on the meta device outside the fake
    mode (its deep copy of the projector would start a second fake mode), then given fake storage."""
    with torch.device("meta"):
        model = ExtreMA(exp.model)
    return fake_storage(model, fake, device)


def fake_storage(model: M, fake: FakeTensorMode, device: torch.device) -> M:
    """A meta-device model with each parameter and buffer given a fake tensor of its shape and dtype on `device`
    (parameters keep whether they require gradients)."""
    with fake:
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    fresh = torch.empty(p.shape, dtype=p.dtype, device=device)
                    module._parameters[name] = nn.Parameter(fresh, p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
    return model


def local_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes this rank holds of these tensors (a DTensor's local shard, padding excluded)."""
    total = 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def per_rank_batch(exp: Experiment, world_size: int, stage: str = "pretrain") -> int:
    """Images per rank per optimizer step of `stage`; ValueError when its global batch does not divide."""
    p = getattr(exp, stage)
    if p.batch_size % world_size:
        raise ValueError(f"{stage}.batch_size {p.batch_size} is not divisible by {world_size} ranks")
    if (p.batch_size // world_size) % p.accum_steps:
        raise ValueError(
            f"{p.batch_size // world_size} images per rank do not split into {p.accum_steps} micro-batches"
        )
    return p.batch_size // world_size


def fake_batch(exp: Experiment, batch: int, device_color: bool) -> Batch:
    """What the pretraining loader hands a rank (call under a FakeTensorMode): two float views, or with colour
    on the device the uint8 crop and each view's colour parameters; masks (B, M, K)."""
    size, m = exp.model.resolved_img_size, exp.pretrain.masking
    chans = exp.model.in_chans
    masks = torch.zeros(batch, m.num_masks, visible_count(exp.model.num_patches, m.ratio), dtype=torch.long)
    if device_color:
        return torch.zeros(batch, chans, size, size, dtype=torch.uint8), torch.zeros(batch, 2, 10), masks
    views = torch.zeros(batch, chans, size, size)
    second = views if exp.data.augmentation == "spatial" else torch.zeros_like(views)
    return views, second, masks


def snapshot_bytes(tracker: MemTracker, kind: str) -> dict[str, int]:
    """The tracker's snapshot (`peak` or `current`) of this process's device, by kind."""
    snaps = list(tracker.get_tracker_snapshot(kind).values())
    if not snaps:
        return {"Total": 0}
    return {str(getattr(k, "value", k)): int(v) for k, v in snaps[0].items()}


@dataclass
class Built:
    """The stage's training objects in a fake world: what `train_step` calls, the ExtreMA, its optimizer."""

    loss_module: nn.Module
    core: ExtreMA
    trainable: nn.Module
    optimizer: torch.optim.Optimizer
    strategy: str


def build(exp: Experiment, world: World, setting: Setting, fake: FakeTensorMode) -> Built:
    """Model, wrapping and optimizer as `extrema.stages.pretrain.run` makes them, with fake storage; DDP (whose
    reducer cannot run on fake tensors) left unwrapped. The optimizer has taken one step (its state exists)."""
    p = exp.pretrain
    strategy = p.strategy if world.size > 1 else "none"
    model = fake_extrema(exp, fake, world.device)
    with fake:
        loss_module, core = wrap(model, world, "none" if strategy == "ddp" else strategy, bf16=setting.bf16)
        trainable = nn.ModuleDict({"online": core.online, "predictor": core.predictor})
        groups = param_groups(trainable, p.weight_decay, no_decay_names=("pos_embed", "cls_token"))
        optimizer = build_adamw(groups, lr=scaled_lr(p.base_lr, p.batch_size), betas=p.betas)
        built = Built(loss_module, core, trainable, optimizer, strategy)
        first_step(exp, built)
    return built


def estimate_pretrain(
    exp: Experiment,
    nodes: int,
    processes_per_node: int,
    target: Target,
    rank: int = 0,
    plan: bool = False,
    step: bool = True,
    fake_device: Target = "cpu",
) -> dict[str, Any]:
    """Memory of one steady pretraining step per rank (bytes by kind, the peak) and its FLOPs at the job's world
    size (unless not `step`); with `plan`, also this rank's checkpoint plan (`extrema.check.plan`). Fake tensors
    on the CPU unless `fake_device` is cuda (a GPU is then needed, and CUDA's own autocast and kernels are used).
    Call in a fresh process: it joins a fake process group as `rank`."""
    if fake_device == "cuda" and not torch.cuda.is_available():
        raise ValueError("fake CUDA tensors need a GPU here (autograd runs a CUDA backward on a device thread)")
    world_size = nodes * processes_per_node
    os.environ["LOCAL_WORLD_SIZE"] = str(processes_per_node)  # HSDP's (nodes, ranks per node) mesh reads it
    world = fake_world(world_size, rank, fake_device)
    setting = Setting.of(exp, target, fake_device)
    batch = per_rank_batch(exp, world_size)
    fake = FakeTensorMode()
    built = build(exp, world, setting, fake)
    result: dict[str, Any] = {
        "stage": "pretrain",
        "world_size": world_size,
        "rank": rank,
        "strategy": built.strategy,
        "target": target,
        "fake_device": fake_device,
        "precision": "bf16" if setting.amp is not None else "fp32",
        "batch_per_rank": batch,
        "micro_batch": batch // exp.pretrain.accum_steps,
    }
    if step:
        with fake:
            result.update(measure_step(exp, built, world, setting, fake_batch(exp, batch, setting.device_color)))
    if plan:
        result["checkpoint"] = plan_checkpoint(built.core, built.optimizer, world)  # outside: offsets are real
    return result


def measure_step(exp: Experiment, built: Built, world: World, setting: Setting, inputs: Batch) -> dict[str, Any]:
    """The EMA update and `train_step` under a memory tracker and a FLOP counter (call under the fake mode):
    bytes per rank by kind, the peak, FLOPs per rank and per step. One step serves both: pretraining checkpoints
    no block (under torch's FLOP counter a checkpointed block's activations stay alive: `downstream.measure` steps
    twice)."""
    p, core, optimizer = exp.pretrain, built.core, built.optimizer
    tracker = memory_tracker(built, inputs)
    flops = flop_counter()
    emulate = CudaAutocastFp32() if setting.cuda_autocast else contextlib.nullcontext()
    core.train()
    with tracker, flops, emulate:
        core.update_target(p.ema_momentum)
        train_step(built.loss_module, optimizer, inputs, p, world, setting.amp, setting.device_color, color(exp))
    peak = snapshot_bytes(tracker, "peak")
    params = local_bytes(built.trainable.parameters())
    buckets = params if built.strategy == "ddp" else 0  # DDP's reducer: one bucket copy of every trainable gradient
    return {
        "memory": {
            "parameters": params,
            "gradients": params + buckets,
            "optimizer": local_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
            "ema_target": local_bytes(core.target.parameters()),
            "activations": activations(peak),
            "peak": peak["Total"] + buckets,
        },
        "at_peak": peak,
        "flops_per_rank": int(flops.get_total_flops()),
        "flops_per_step": int(flops.get_total_flops()) * world.size,
    }


def memory_tracker(built: Built, inputs: Batch) -> MemTracker:
    """torch's tracker for this wrapping, told of the model, its optimizer's state and the batch beforehand."""
    if built.strategy in ("fsdp", "hsdp"):
        fsdp = FSDPWholePeak(built.core, built.optimizer)
        fsdp.track_inputs(inputs)
        return fsdp
    plain = FrozenAwareMemTracker()
    plain.track_external(built.core, built.optimizer, *inputs)
    return plain


def activations(peak: dict[str, int]) -> int:
    """Forward activations held at the peak (the trackers' `Activation` kind)."""
    return peak.get("Activation", 0)


def color(exp: Experiment) -> bool:
    """Whether the two views get independent colour augmentation."""
    return exp.data.augmentation == "spatial_consistent_color"


def first_step(exp: Experiment, built: Built) -> None:
    """One optimizer step on zero gradients, after the EMA update (and the gradient clipping) the loop runs:
    the optimizer's state exists, as at every step after the first, and DTensor has planned these operations,
    so that the measured step counts none of the global-shape fake tensors its first planning makes."""
    for q in built.trainable.parameters():
        if q.requires_grad:
            q.grad = torch.zeros_like(q)
    built.core.update_target(exp.pretrain.ema_momentum)
    if exp.pretrain.clip_grad is not None:
        nn.utils.clip_grad_norm_([q for q in built.core.parameters() if q.grad is not None], exp.pretrain.clip_grad)
    built.optimizer.step()
    built.optimizer.zero_grad(set_to_none=True)


def max_batch_per_rank(result: dict[str, Any], limit: int) -> int:
    """The largest images per rank whose predicted peak stays under `limit`: activations grow with the batch, the
    rest does not (a linear model through this estimate's batch, or `activations_per_image` where the estimate's
    batch does not show an image's share: detect's batch of one); moments no batch changes (knn's search and
    gather, inpainting's evaluation batch: `batch_free_peak`) must fit too."""
    memory, batch = result["memory"], result["batch_per_rank"]
    if result.get("batch_free_peak", 0) > limit:
        return 0
    fixed = result.get("forward_peak", memory["peak"]) - memory["activations"]
    per_image = result.get("activations_per_image", memory["activations"] / batch)
    if per_image <= 0:
        return batch
    return max(0, math.floor((limit - fixed) / per_image))
