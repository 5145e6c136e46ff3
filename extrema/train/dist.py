"""Process groups from any launcher (torchrun, Slurm, Ray Train, or none), FSDP2/DDP wrapping, preemption."""

from __future__ import annotations

import contextlib
import gc
import importlib
import itertools
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import unset_fake_temporarily
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.nn.parallel import DistributedDataParallel

from extrema.run.contract import collective_timeout_s, this_process

if TYPE_CHECKING:
    from extrema.models.extrema import ExtreMA


RANK_RECORD_BYTES = 512  # one rank's {"host", "pid"} as JSON, padded, in the all-gather of `rank_places`


@dataclass(frozen=True)
class World:
    """Where this process sits: its rank, the world size, its local rank and its device."""

    rank: int
    size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0


def env_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun / Ray Train variables, else Slurm's, else (0, 1, 0)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def collective_timeout() -> timedelta:
    """How long a rank waits in one collective (and at rendezvous): the launcher's setting, 600 s by default."""
    return timedelta(seconds=collective_timeout_s())


def init_world() -> World:
    """Join (or reuse) the default process group when the world has more than one process."""
    rank, size, local = env_rank()
    if torch.cuda.is_available():
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        allow_tf32()
    if size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=collective_timeout())
        _owned.add(id(dist.group.WORLD))
    if dist.is_initialized():
        rank, size = dist.get_rank(), dist.get_world_size()
    return World(rank, size, local, device)


def allow_tf32() -> None:
    """fp32 matmuls and convolutions on CUDA in TF32 (10-bit mantissa inputs, fp32 accumulation): the usual setting
    for training; bf16 autocast regions are unaffected."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def processes_per_node(world_size: int) -> int:
    """Ranks per node from the launcher (torchrun's or Ray Train's LOCAL_WORLD_SIZE, Slurm's SLURM_NTASKS_PER_NODE);
    the whole world when none says (one node)."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return world_size


def shard_mesh(world: World, strategy: str) -> Any:
    """FSDP2's device mesh: flat over every rank (fsdp), or HSDP's (nodes, ranks per node) with parameters sharded
    within a node and replicated across nodes (hsdp: the usual choice for models of ~100M parameters on several
    nodes, whose all-gathers then stay inside a node). Built from real tensors even under fake ones (the memory
    check, `extrema.check`): a mesh reads its rank layout back, which a fake tensor cannot answer."""
    with unset_fake_temporarily():
        if strategy != "hsdp":
            return init_device_mesh(world.device.type, (world.size,))
        per_node = processes_per_node(world.size)
        if world.size % per_node:
            raise ValueError(f"hsdp: world size {world.size} is not a multiple of {per_node} ranks per node")
        shape = (world.size // per_node, per_node)
        return init_device_mesh(world.device.type, shape, mesh_dim_names=("replicate", "shard"))


# DTensor's global caches (sharding propagation, redistribute plans, mesh topology) keep every DeviceMesh they saw,
# and a DeviceMesh keeps its process groups: FSDP2's mesh would outlive `destroy_process_group` through them.
MESH_CACHES = (
    ("torch.distributed.tensor.debug", "_clear_sharding_prop_cache"),
    ("torch.distributed.tensor._redistribute", "_gen_transform_infos.cache_clear"),
    ("torch.distributed.tensor._redistribute", "clear_redistribute_planner_cache"),
    ("torch.distributed.tensor._collective_utils", "MeshTopoInfo.build_from_mesh.cache_clear"),
)
GLOO_WORKER = "pt_gloo_runloop"  # the thread name of ProcessGroupGloo's workers


def drop_mesh_caches() -> None:
    """Clear DTensor's global caches (those this torch has), which hold on to device meshes."""
    if "torch.distributed.tensor" not in sys.modules:
        return
    for module, path in MESH_CACHES:
        try:
            target: Any = importlib.import_module(module)
        except ImportError:
            continue
        for name in path.split("."):
            target = getattr(target, name, None)
        if callable(target):
            target()


def thread_names() -> list[str]:
    """Names of this process's native threads (empty where /proc is unavailable)."""
    names: list[str] = []
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            continue  # the thread ended meanwhile
    return names


_side_groups: dict[int, Any] = {}
_owned: set[int] = set()  # default groups this process created (a launcher such as Ray Train owns the others)


def side_group() -> Any:
    """A gloo process group apart from the default one, created collectively on first use in a world: for
    collectives that run in a background thread (DCP's async save), which must never interleave with training's
    on the default group (they hang). Released by `release_world`."""
    key = id(dist.group.WORLD)
    if key not in _side_groups:
        _side_groups.clear()
        _side_groups[key] = dist.new_group(backend="gloo")
    return _side_groups[key]


def drop_side_groups(destroy: bool) -> None:
    """Forget this world's side groups, destroying them first when asked. A function of its own, so that no local
    variable keeps a group (and its gloo threads) alive while the world is destroyed."""
    if destroy:
        for group in _side_groups.values():
            dist.destroy_process_group(group)
    _side_groups.clear()


def release_world() -> None:
    """Destroy every process group this process created and join gloo's worker threads while the interpreter is
    whole. A world a launcher set up (Ray Train) stays: the launcher destroys it when its workers end.

    A gloo worker frees a finished collective's tensors itself, taking the GIL to drop their Python objects. If
    the interpreter is finalising by then, CPython ends that thread with pthread_exit, whose unwinding through
    a noexcept destructor calls std::terminate: SIGABRT, "terminate called without an active exception".
    `destroy_process_group` joins the workers only when nothing else holds the group, so the references FSDP2
    leaves behind (DTensor's caches -> DeviceMesh -> group; module cycles) go first.
    """
    if not dist.is_initialized():
        return
    owned = id(dist.group.WORLD) in _owned
    drop_side_groups(destroy=not owned)  # a launcher's world is destroyed later, with every group in it
    drop_mesh_caches()
    gc.collect()
    if not owned:
        return
    _owned.clear()
    dist.destroy_process_group()
    left = thread_names().count(GLOO_WORKER)
    if left:
        print(
            f"extrema.train.dist: {left} gloo worker threads outlived destroy_process_group (something still holds the "
            "process group); the process may abort at exit",
            file=sys.stderr,
            flush=True,
        )


def rank_places() -> list[dict[str, Any]]:
    """Every rank's {"rank", "host", "pid"} in rank order (one all-gather of fixed-size JSON when distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [this_process()]
    mine = this_process()
    raw = json.dumps({"host": mine["host"], "pid": mine["pid"]}).encode()[:RANK_RECORD_BYTES]
    row = torch.zeros(RANK_RECORD_BYTES, dtype=torch.uint8)  # JSON never holds a NUL byte: zeros are padding
    row[: len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else row.device
    rows = all_gather_rows(row.to(device)[None]).cpu()
    places = []
    for rank, r in enumerate(rows):
        text = bytes(r.tolist()).rstrip(b"\0").decode(errors="replace")
        try:
            place = json.loads(text)
        except ValueError:
            place = {"host": text[:255], "pid": None}
        places.append({"rank": rank, "host": str(place.get("host")), "pid": place.get("pid")})
    return places


MAIN_WAIT = timedelta(days=7)  # how long other ranks wait for rank 0 to be ready (its death ends the wait sooner)
ARRIVAL_WAIT_S = 1800.0  # how long rank 0 waits for every other rank to start (a cold node, a slow file system)
ARRIVAL_POLL_S = 0.5


class RanksMissing(RuntimeError):
    """Some ranks never reached the start of the stage within ARRIVAL_WAIT_S."""


def wait_for_all(key: str, limit_s: float = ARRIVAL_WAIT_S) -> None:
    """Every rank says in the process group's store that it reached `key`, and the world goes on only when all have,
    rank 0 last: the collective that follows then starts with every rank present. Ranks start at different times (a
    retry's fresh node imports and unpacks the code while rank 0 is ready), and a collective's timeout, meant for a
    step, must not end a rank's wait for a peer that is still starting. Rank 0 names the ranks that never came."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    rank, size = dist.get_rank(), dist.get_world_size()
    store.set(f"{key}/arrived/{rank}", "1")
    if rank != 0:
        store.wait([f"{key}/go"], MAIN_WAIT)
        return
    waiting = [f"{key}/arrived/{r}" for r in range(1, size)]
    deadline = time.monotonic() + limit_s
    while waiting:
        waiting = [k for k in waiting if not store.check([k])]
        if waiting and time.monotonic() > deadline:
            missing = ", ".join(k.rsplit("/", 1)[1] for k in waiting[:16])
            raise RanksMissing(
                f"ranks {missing} (of {size}) did not start within {limit_s:g} s; every other rank is ready"
            )
        if waiting:
            time.sleep(ARRIVAL_POLL_S)
    store.set(f"{key}/go", "1")


def wait_for_main(key: str) -> None:
    """Rank 0 sets `key` in the process group's store; the other ranks wait for it there, not in a collective, so
    that rank 0 may take its time (waiting for a stage's lease) without the collective timeout ending the wait.
    The store lives with rank 0 (or its launcher): if that dies, the wait ends with an error at once."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    if dist.get_rank() == 0:
        store.set(key, "1")
    else:
        store.wait([key], MAIN_WAIT)


_main_sections = itertools.count()


def after_main(name: str) -> None:
    """Call on every rank after a section only rank 0 runs (COCO scoring, a large write): the other ranks wait in
    the store, with no collective timeout, until rank 0 is through, so that the collective which follows (its
    broadcast) starts when every rank is there. A rank-0-only section longer than the collective timeout would
    otherwise end the job (NCCL's watchdog tears a waiting rank down)."""
    wait_for_main(f"extrema/main-section/{name}/{next(_main_sections)}")


def barrier() -> None:
    """Synchronise all ranks (no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over ranks (identity without a process group)."""
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


M = TypeVar("M", bound=nn.Module)


def data_parallel(module: M, world: World) -> tuple[M, nn.Module]:
    """A supervised stage's model on its device, and what its loop calls: DDP over several ranks (with BatchNorm
    synchronised across GPUs; SyncBatchNorm runs on GPUs only), the model itself in one process."""
    if world.size > 1 and world.device.type == "cuda":
        module = cast(M, nn.SyncBatchNorm.convert_sync_batchnorm(module))
    module = module.to(world.device)
    if world.size == 1:
        return module, module
    return module, DistributedDataParallel(
        module, device_ids=[world.device.index] if world.device.type == "cuda" else None
    )


SLOW_BF16_CAPABILITIES = ("DEFAULT", "AVX2")  # x86 CPUs without AVX-512: bf16 matmuls have no vector units here


def slow_bf16(device: torch.device, capability: str) -> bool:
    """Whether bf16 matrix products on this device run far slower than fp32 (a CPU whose best vector instruction
    set, as torch names it, is AVX2 or less: measured about 30x slower on a 1024 x 1024 product)."""
    return device.type == "cpu" and capability in SLOW_BF16_CAPABILITIES


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a stage's `precision`: bf16 on GPU (and on CPU when asked), None for fp32; a CPU
    where bf16 is slow gets a one-line warning naming the setting that avoids it (the numerics stay as asked)."""
    dtype = torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else None
    capability = torch.backends.cpu.get_cpu_capability()
    if dtype is not None and slow_bf16(device, capability):
        print(
            f"extrema: warning: precision bf16 on this CPU ({capability}, no AVX-512) makes every matrix product "
            "tens of times slower than fp32; set the stage's precision: fp32 to run at this CPU's speed",
            file=sys.stderr,
            flush=True,
        )
    return dtype


def broadcast_buffers(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics), which DDP only syncs at each training forward:
    after the last step each rank holds the statistics of its own batch."""
    if dist.is_initialized():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def apply_fsdp(model: ExtreMA, world: World, bf16: bool, strategy: str = "fsdp") -> ExtreMA:
    """FSDP2 (or HSDP): shard every transformer block, each head and each branch of online and target alike, then
    the root, and make the whole model the root at once.

    Online and target are sharded identically, so the EMA update is a shard-local foreach with no gathers.
    """
    mesh = shard_mesh(world, strategy)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs: dict[str, Any] = {"mesh": mesh}
    if mp is not None:
        kwargs["mp_policy"] = mp
    for branch in (model.online, model.target):
        for block in [*branch.encoder.blocks, *branch.encoder.blocks_token]:
            fully_shard(block, **kwargs)
        fully_shard(branch.encoder, **kwargs)
        register_fsdp_forward_method(branch.encoder, "forward_features")
        fully_shard(branch.projector, **kwargs)
        fully_shard(branch, **kwargs)
    fully_shard(model.predictor, **kwargs)
    fully_shard(model, **kwargs)
    settle_root(model)
    return model


def settle_root(model: nn.Module) -> None:
    """Make `model` the FSDP2 root now. FSDP2 makes the first sharded module to run forward the root; when that is
    a part (the kNN monitor runs the target encoder before any training step), the part keeps unsharded parameters
    and the whole model's first forward fails. torch has no public call for this lazy initialisation."""
    state = model._get_fsdp_state()  # type: ignore[operator]
    state._lazy_init()


def wrap(model: ExtreMA, world: World, strategy: str, bf16: bool) -> tuple[nn.Module, ExtreMA]:
    """(module to call for the loss, the ExtreMA underneath) for strategy fsdp | hsdp | ddp | none."""
    if world.size == 1 or strategy == "none":
        return model, model
    if strategy in ("fsdp", "hsdp"):
        return apply_fsdp(model, world, bf16, strategy), model
    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids), model


@contextlib.contextmanager
def gradient_sync(module: nn.Module, sync: bool) -> Iterator[None]:
    """The backward passes inside reduce gradients across ranks only when `sync`: a micro-batch of gradient
    accumulation that is not the last keeps its gradients local (FSDP2's requires_gradient_sync, DDP's no_sync)."""
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)
        yield
    elif isinstance(module, DistributedDataParallel) and not sync:
        with module.no_sync():
            yield
    else:
        yield


def gather_keys(k: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' keys (no gradient) and the row offset of this rank's keys, for InfoNCE."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return k, 0
    parts = [torch.empty_like(k) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, k.detach().contiguous())
    return torch.cat(parts), dist.get_rank() * k.shape[0]


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate a (n_r, ...) tensor from every rank in rank order; n_r may differ by rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


PREEMPT_CHECK_EVERY = 10  # steps between the cross-rank preemption agreements (one tiny all-reduce each)


class Preemption:
    """SIGUSR2/SIGTERM set a flag; `should_stop` agrees across ranks at a step boundary (never in the handler)."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self) -> None:
        self.flag = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> Preemption:
        # Signal handlers live in the main thread; a stage run in a worker thread (Ray Train) relies on
        # its launcher's own failure handling instead.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        self.flag = True

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank if any rank was signalled (one all-reduce when distributed)."""
        if not dist.is_initialized():
            return self.flag
        t = torch.tensor([1.0 if self.flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)
