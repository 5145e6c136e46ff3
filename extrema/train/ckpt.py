"""Checkpoints with torch.distributed.checkpoint (DCP) on any fsspec URL.

Layout: `<ckpt>/step-<N>/` written by DCP; its `.metadata` file (renamed into place last) marks it complete, and
the newest complete step is the latest. A step directory without `.metadata` is never chosen and is removed by
`clean_incomplete`. Works in one plain process and under FSDP/DDP.

Commits are durable and fenced (`DurableWriter`): shards and their directory entries reach the disk before
`.metadata` is renamed into place, and only while the fence the writer is given (`lease.Fence`: this attempt's lease,
handed down by the stage) passes. Resuming (`restore`) takes the newest complete step that loads; one that does not
is logged, recorded in the stage's status.json (`checkpoint_skips`) and moved to
`<ckpt>/corrupt/step-N-<unix time>`, and the next older is tried.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsspec.implementations.local import LocalFileSystem
from torch import nn
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import _StoragePrefix
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from extrema.run import contract, lease, rundir
from extrema.run.checkpoint_dirs import COMMIT_MARKER, CORRUPT_DIR, beyond_retention, step_of
from extrema.train.dist import barrier, side_group
from extrema.train.safe_dcp import JsonSavePlanner, SafeFsspecReader

# What a failed write reports (the disk is full, over quota, read-only, failing): worth naming over torch's words.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO)
# Not the checkpoint's fault: re-raised as they are, never a reason to skip a step.
NOT_THE_CHECKPOINT = (KeyboardInterrupt, SystemExit, MemoryError, torch.OutOfMemoryError, lease.LeaseLost)
# DCP warns on every call without a process group; one plain process is a supported mode here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
# Object stores have no fsync: a closed object is stored; DCP warns for every file.
warnings.filterwarnings("ignore", message="fsync not supported for this stream")


class CheckpointError(RuntimeError):
    """A checkpoint that could not be saved or loaded; the message names its URL and the reason."""


def step_url(ckpt_dir: str, step: int) -> str:
    """URL of the directory holding step N."""
    return rundir.join(ckpt_dir, f"step-{step}")


def is_rank0() -> bool:
    """Whether this process writes shared files (rank 0, or no process group)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def list_steps(ckpt_dir: str) -> dict[int, bool]:
    """Every step directory present -> whether it is complete (has DCP's `.metadata`)."""
    fs, path = rundir.filesystem(ckpt_dir)
    if not fs.exists(path):
        return {}
    out: dict[int, bool] = {}
    for entry in fs.ls(path, detail=False):
        name = str(entry).rstrip("/").rsplit("/", 1)[-1]
        step = step_of(name)
        if step is not None:
            out[step] = bool(fs.exists(f"{path.rstrip('/')}/{name}/{COMMIT_MARKER}"))
    return out


def complete_steps(ckpt_dir: str) -> list[int]:
    """Every complete step, newest first."""
    return sorted((s for s, ok in list_steps(ckpt_dir).items() if ok), reverse=True)


def latest_step(ckpt_dir: str) -> int | None:
    """The newest complete step, or None."""
    steps = complete_steps(ckpt_dir)
    return steps[0] if steps else None


def clean_incomplete(ckpt_dir: str) -> list[int]:
    """Remove step directories that never got their commit marker; returns the removed steps."""
    removed = []
    if is_rank0():
        fs, _ = rundir.filesystem(ckpt_dir)
        for s, ok in list_steps(ckpt_dir).items():
            if not ok:
                fs.rm(rundir.filesystem(step_url(ckpt_dir, s))[1], recursive=True)
                removed.append(s)
    return removed


def apply_retention(ckpt_dir: str, keep_last: int, keep_every: int | None = None) -> list[int]:
    """Delete complete steps beyond the newest `keep_last`, sparing multiples of `keep_every`
    (`extrema.run.checkpoint_dirs.beyond_retention`, the rule `extrema-launch gc` applies too)."""
    if not is_rank0():
        return []
    doomed = beyond_retention((s for s, ok in list_steps(ckpt_dir).items() if ok), keep_last, keep_every)
    fs, _ = rundir.filesystem(ckpt_dir)
    for s in doomed:
        fs.rm(rundir.filesystem(step_url(ckpt_dir, s))[1], recursive=True)
    return doomed


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, extra: Any) -> dict[str, Any]:
    """The DCP state dict of a training job: model, optimizer (FQN-keyed, shard-aware) and extras."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "extra": extra}


def fsync_dir(url: str) -> None:
    """Make a local directory's entries (files created or renamed in it) durable; a no-op on object stores."""
    fs, path = rundir.filesystem(url)
    if not isinstance(fs, LocalFileSystem):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems refuse fsync on a directory; nothing more can be done there
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def os_error_named(url: str) -> Iterator[None]:
    """Raise a write that failed for an OS reason (a full disk...) as that OSError, naming `url` where it names no path.

    torch's zip writer reports a failed write as "unexpected pos 704 vs 598", keeping the OSError only as its
    context, which does not survive the trip to the coordinator rank.
    """
    try:
        yield
    except Exception as e:
        found = next((c for c in contract.chain(e) if isinstance(c, OSError) and c.errno in WRITE_ERRNOS), None)
        if found is None or found.errno is None or (found is e and found.filename):
            raise
        raise OSError(found.errno, found.strerror or os.strerror(found.errno), found.filename or url) from e


class DurableWriter(FsspecWriter):
    """DCP's fsspec writer with a durable, fenced commit.

    Every rank fsyncs its shards (`sync_files`) and then their directory; the coordinator checks the stage's lease
    (`fence`), writes and fsyncs `.metadata`, renames it into place and fsyncs the step directory and its
    parent. So after a node crash a `.metadata` never names data that did not reach the disk, and an attempt that
    lost its stage never commits. Each save names its files afresh (`checkpoint_dirs.SHARD_FILE`) and checks the
    lease before writing them: an attempt that lost its stage while frozen and writes on leaves unreferenced files,
    never overwritten data under a later attempt's `.metadata`.
    """

    def __init__(self, url: str, fence: lease.Fence) -> None:
        super().__init__(url, sync_files=True)
        self.url = url
        self.fence = fence

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Name rank i's files `__<i>_<save>_<n>.distcp`, one fresh `<save>` for this save (coordinator only)."""
        save = uuid.uuid4().hex[:12]
        return [dataclasses.replace(p, storage_data=_StoragePrefix(f"__{i}_{save}_")) for i, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Check the lease, then write and fsync this rank's shards and their directory entries."""
        self.fence(f"checkpoint {self.url}")
        with os_error_named(self.url):
            written: Future[list[WriteResult]] = super().write_data(plan, planner)
            fsync_dir(self.url)
        return written

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit (coordinator only): fence, write + fsync + rename `.metadata`, fsync the directories."""
        self.fence(f"checkpoint {self.url}")
        with os_error_named(self.url):
            super().finish(metadata, results)
            fsync_dir(self.url)
            fsync_dir(self.url.rstrip("/").rsplit("/", 1)[0])


def raise_if_not_about_checkpoint(exc: BaseException) -> None:
    """Re-raise an interrupt, exit, out-of-memory or lost lease found anywhere in `exc` (DCP wraps them all)."""
    for e in contract.chain(exc):
        if isinstance(e, NOT_THE_CHECKPOINT):
            raise e


def reason(exc: BaseException) -> str:
    """One line on why a checkpoint failed, from inside DCP's CheckpointException (whose message is its ranks)."""
    inner = [e for e in contract.chain(exc) if not isinstance(e, CheckpointException)] or [exc]
    full = [e for e in inner if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)]
    if full:
        return contract.os_reason(full[0])
    return str(inner[0]) if isinstance(inner[0], CheckpointError) else contract.describe_error(inner[0])


@contextlib.contextmanager
def saving(url: str) -> Iterator[None]:
    """Turn DCP's failures (BaseExceptions) into a CheckpointError naming the step and the reason."""
    try:
        yield
    except BaseException as e:
        raise_if_not_about_checkpoint(e)
        raise CheckpointError(f"checkpoint {url} was not saved: {reason(e)}") from e


def save(ckpt_dir: str, step: int, state: dict[str, Any], fence: lease.Fence = lease.unfenced) -> str:
    """Write one checkpoint collectively and return its URL once DCP has committed `.metadata` durably.

    CheckpointError when it fails (a full disk says so); LeaseLost when `fence` finds this attempt no longer owns
    the stage.
    """
    url = step_url(ckpt_dir, step)
    with saving(url):
        dcp.save(state, storage_writer=DurableWriter(url, fence), planner=JsonSavePlanner())
    return url


class Saver:
    """A stage's checkpoint writer: blocking saves, or one background save in flight that the next save (or
    `wait`) completes first. Background saves stage tensors to host memory and need a process group. Every commit
    passes `fence` first."""

    def __init__(self, ckpt_dir: str, fence: lease.Fence = lease.unfenced) -> None:
        self.ckpt_dir = ckpt_dir
        self.fence = fence
        self._pending: tuple[Any, int] | None = None  # (DCP's async-save future, step)

    def wait(self) -> None:
        """Block until the background save in flight (if any) has committed; CheckpointError when it failed."""
        if self._pending is not None:
            future, step = self._pending
            self._pending = None
            with saving(step_url(self.ckpt_dir, step)):
                future.result()

    def save(self, step: int, state: dict[str, Any], background: bool = False) -> str:
        """Write step N (in the background when asked and a process group exists); returns its URL."""
        self.wait()
        if not (background and dist.is_initialized()):
            return save(self.ckpt_dir, step, state, self.fence)
        url = step_url(self.ckpt_dir, step)
        with saving(url):
            future = dcp.async_save(
                state,
                storage_writer=DurableWriter(url, self.fence),
                planner=JsonSavePlanner(),
                process_group=side_group(),
            )
        self._pending = (future, step)
        return url


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """A plain, unsharded CPU state dict of a module (gathered from its shards under FSDP)."""
    sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def write_torch(url: str, obj: Any) -> None:
    """torch.save to any fsspec URL, atomically (write then rename)."""
    fs, path = rundir.filesystem(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp"
    with fs.open(tmp, "wb") as f:
        torch.save(obj, f)
    fs.mv(tmp, path)


def read_torch(url: str) -> Any:
    """torch.load(weights_only=True) from any fsspec URL."""
    fs, path = rundir.filesystem(url)
    return rundir.read_stable(fs, path, "rb", lambda f: torch.load(f, map_location="cpu", weights_only=True))


def verify(url: str) -> None:
    """CheckpointError unless a step's `.metadata` reads and every file it names is there and long enough.

    No tensor is read, so a step that would fail part-way through loading is usually refused before anything of
    it was copied into the model.
    """
    try:
        storage = dict(SafeFsspecReader(url).read_metadata().storage_data)
    except Exception as e:
        raise CheckpointError(f".metadata is unreadable: {contract.describe_error(e)}") from e
    need: dict[str, int] = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    fs, path = rundir.filesystem(url)
    sizes = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0) for e in fs.ls(path, detail=True)}
    for name, end in sorted(need.items()):
        if name not in sizes:
            raise CheckpointError(f"{name} is missing")
        if sizes[name] < end:
            raise CheckpointError(f"{name} is truncated: {sizes[name]} bytes, .metadata needs {end}")


def attempt(fn: Callable[..., Any], *args: Any) -> str | None:
    """Run fn(*args): None when it succeeds, else why it failed (interrupts and lost leases are re-raised)."""
    try:
        fn(*args)
    except BaseException as e:
        raise_if_not_about_checkpoint(e)
        return reason(e)
    return None


def load(url: str, state: dict[str, Any]) -> None:
    """Load a checkpoint in place into `state` (any world size: DCP reshards); CheckpointError naming the URL."""
    try:
        dcp.load(state, storage_reader=SafeFsspecReader(url))
    except BaseException as e:
        raise_if_not_about_checkpoint(e)
        why = attempt(verify, url) or reason(e)
        raise CheckpointError(f"checkpoint {url} cannot be loaded: {why}") from e


def world_size() -> int:
    """Ranks in the default process group (1 without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def from_rank0(obj: Any) -> Any:
    """Rank 0's value of `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_failure(why: str | None) -> str | None:
    """The lowest failing rank's reason, the same on every rank; None when every rank succeeded."""
    if world_size() == 1:
        return why
    everyone: list[str | None] = [None] * world_size()
    dist.all_gather_object(everyone, why)
    return next((f"rank {r}: {w}" if r else w for r, w in enumerate(everyone) if w is not None), None)


def set_aside(ckpt_dir: str, step: int, why: str, fence: lease.Fence) -> None:
    """Log a step that failed to load, move it to `<ckpt>/corrupt/step-N-<unix time>` and append it to the stage's
    status.json `checkpoint_skips` (rank 0, once `fence` passes; every rank waits), so that nothing looking for the
    latest step chooses it again and a new save of step N starts in an empty directory."""
    url = step_url(ckpt_dir, step)
    if is_rank0():
        print(f"extrema.train.ckpt: skipping checkpoint step {step} at {url}: {why}", file=sys.stderr, flush=True)
        fence(f"moving {url} aside")
        fs, path = rundir.filesystem(url)
        aside = rundir.join(ckpt_dir, CORRUPT_DIR, f"step-{step}-{int(time.time())}")
        if rundir.exists(aside):
            aside = f"{aside}-{uuid.uuid4().hex[:6]}"
        aside_path = rundir.filesystem(aside)[1]
        fs.makedirs(aside_path.rsplit("/", 1)[0], exist_ok=True)
        fs.mv(path, aside_path, recursive=True)
        stage_dir = ckpt_dir.rstrip("/").rsplit("/", 1)[0]
        try:
            skips = list(contract.read_status(stage_dir).get("checkpoint_skips") or [])
        except contract.Unreadable:
            skips = []
        contract.update_status(stage_dir, checkpoint_skips=[*skips, {"step": step, "reason": why}])
    barrier()


def load_training_state(url: str, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load one step into `state` and from there into model and optimizer."""
    dcp.load(state, storage_reader=SafeFsspecReader(url))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def restore(
    ckpt_dir: str, model: nn.Module, optimizer: torch.optim.Optimizer, extra: Any, fence: lease.Fence = lease.unfenced
) -> Any | None:
    """Resume from the newest complete step that loads: fills model and optimizer and returns the saved extras (a
    DCP `Stateful` given as `extra` is filled in place and returned; a dict template comes back as a new dict), or
    None when there is no checkpoint. A step that fails is set aside (logged, recorded, moved once `fence` passes) and
    the next older one is tried; every rank takes the same decision. CheckpointError when none loads after one failed
    part-way through filling the model.
    """
    clean_incomplete(ckpt_dir)
    barrier()
    touched = None
    for step in from_rank0(complete_steps(ckpt_dir) if is_rank0() else None):
        url = step_url(ckpt_dir, step)
        why = from_rank0(attempt(verify, url) if is_rank0() else None)
        if why is None:
            template = extra if isinstance(extra, Stateful) else dict(extra)
            touched, state = step, training_state(model, optimizer, template)
            why = first_failure(attempt(load_training_state, url, model, optimizer, state))
            if why is None:
                return extra if isinstance(extra, Stateful) else dict(state["extra"])
        set_aside(ckpt_dir, step, why, fence)
    if touched is not None:
        raise CheckpointError(
            f"no checkpoint under {ckpt_dir} loads; step {touched} failed part-way, so the model may hold some of its"
            f" tensors: not training from that (the steps are in {rundir.join(ckpt_dir, CORRUPT_DIR)}; the next"
            " attempt starts afresh)"
        )
    return None


def load_module(url: str, module: nn.Module, prefix: str = "model.") -> None:
    """Load one module's weights from a training checkpoint (strict), e.g. prefix 'model.target.encoder.'.

    CheckpointError naming `url` when that step cannot be loaded: the caller named it, so no other is tried.
    """
    sd, _ = get_state_dict(module, [], options=StateDictOptions(strict=True))
    wanted = {f"model.{prefix.removeprefix('model.')}{k}": v for k, v in sd.items()}
    load(url, wanted)
    strip = len(f"model.{prefix.removeprefix('model.')}")
    set_state_dict(module, [], model_state_dict={k[strip:]: v for k, v in wanted.items()}, optim_state_dict={})
