"""Gradient accumulation reduces gradients once per optimizer step, not once per micro-batch (extrema.train.dist's
`gradient_sync`), for FSDP2 and DDP, counted in two real gloo processes; the accumulated gradients are the same."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from extrema.train.dist import gradient_sync
from launch.backends.ray.head import free_ports
from tests.processes import end_world

MICRO_BATCHES = 3


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))


def accumulate(strategy: str, defer: bool, rank: int) -> dict:
    """One optimizer step's gradients over MICRO_BATCHES micro-batches, and how many reductions ran."""
    net = model()
    calls = [0]
    original = dist.reduce_scatter_single
    if strategy == "fsdp":
        mesh = init_device_mesh("cpu", (2,))
        for layer in (net[0], net[2]):
            fully_shard(layer, mesh=mesh)
        wrapped: nn.Module = fully_shard(net, mesh=mesh)

        def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
            calls[0] += 1
            return original(*args, **kwargs)

        dist.reduce_scatter_single = counted  # type: ignore[assignment]
    else:
        wrapped = DistributedDataParallel(net)

        def hook(state, bucket):  # type: ignore[no-untyped-def]
            calls[0] += 1
            return dist.all_reduce(bucket.buffer().div_(2), async_op=True).get_future().then(lambda f: f.value()[0])

        wrapped.register_comm_hook(None, hook)
    torch.manual_seed(1 + rank)
    x = torch.randn(MICRO_BATCHES * 4, 8)
    try:
        for i, chunk in enumerate(x.chunk(MICRO_BATCHES)):
            with gradient_sync(wrapped, sync=(i == MICRO_BATCHES - 1) or not defer):
                wrapped(chunk).square().mean().backward()
    finally:
        dist.reduce_scatter_single = original  # type: ignore[assignment]
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in wrapped.parameters()]
    return {"calls": calls[0], "grads": [g.clone() for g in grads]}


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    runs = {f"{s}-{d}": accumulate(s, d, rank) for s in ("fsdp", "ddp") for d in (False, True)}
    if rank == 0:
        torch.save(runs, out)
    del runs
    end_world()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Both strategies, each reducing every micro-batch and only the last, in one pair of gloo processes."""
    out = str(tmp_path_factory.mktemp("sync") / "runs.pt")
    mp.spawn(worker, args=(free_ports(1)[0], out), nprocs=2, join=True)
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_accumulation_reduces_once_per_step_with_the_same_gradients(runs: dict, strategy: str) -> None:
    every, once = runs[f"{strategy}-False"], runs[f"{strategy}-True"]
    assert every["calls"] == MICRO_BATCHES * once["calls"] and once["calls"] >= 1, (every["calls"], once["calls"])
    for a, b in zip(every["grads"], once["grads"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
