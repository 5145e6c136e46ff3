"""A pretraining checkpoint planned at the job's world size, on one rank of a fake process group: the state the
stage saves (`ckpt.training_state` of the wrapped model, its optimizer and the loop state) and DCP's save plan
for it (`JsonSavePlanner`, as `ckpt.save` writes it), with every sharded tensor checked against the exact
division of its rows over the ranks. A sharding bug at 64 ranks then shows up on a laptop.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor, Shard

from extrema.stages.pretrain import KNN_START
from extrema.train import ckpt
from extrema.train.dist import World
from extrema.train.safe_dcp import JsonSavePlanner
from extrema.train.step_end import LoopState


def exact_rows(rows: int, parts: int, index: int) -> tuple[int, int]:
    """(first row, row count) of part `index` when `rows` are cut into `parts` as torch.chunk cuts them: parts of
    ceil(rows / parts) rows, the last ones shorter or empty."""
    size = -(-rows // parts)
    first = min(index * size, rows)
    return first, min(size, rows - first)


def exact_chunk(t: DTensor) -> tuple[list[int], list[int]]:
    """(offsets, sizes) of this rank's part of a DTensor, from its global shape, its placements and this rank's
    place in its mesh, by `exact_rows` alone."""
    offsets, sizes = [0] * t.ndim, list(t.shape)
    coordinate = t.device_mesh.get_coordinate()
    assert coordinate is not None, "this rank is not in the tensor's mesh"
    for mesh_dim, placement in enumerate(t.placements):
        if isinstance(placement, Shard):
            first, count = exact_rows(sizes[placement.dim], t.device_mesh.size(mesh_dim), coordinate[mesh_dim])
            offsets[placement.dim] += first
            sizes[placement.dim] = count
    return offsets, sizes


def sharded_tensors(state: Any, prefix: str = "") -> dict[str, DTensor]:
    """Every DTensor in a nested state dict, by its dotted path."""
    if isinstance(state, DTensor):
        return {prefix: state}
    if isinstance(state, dict):
        found: dict[str, DTensor] = {}
        for key, value in state.items():
            found.update(sharded_tensors(value, f"{prefix}.{key}" if prefix else str(key)))
        return found
    return {}


def plan_checkpoint(core: torch.nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict[str, Any]:
    """This rank's DCP save plan of the stage's training state: items, bytes, and the sharded tensors whose
    planned chunk is not this rank's exact share (`mismatches`; empty when the sharding is right)."""
    state = ckpt.training_state(core, optimizer, LoopState(values=KNN_START, rng=world))
    state = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()}  # as dcp.save does
    planner = JsonSavePlanner()
    planner.set_up_planner(state, is_coordinator=world.rank == 0)
    plan = planner.create_local_plan()
    shards = sharded_tensors(planner.state_dict)
    mismatches: list[str] = []
    planned: set[str] = set()
    written = 0
    for item in plan.items:
        if item.type == WriteItemType.BYTE_IO or item.tensor_data is None:
            continue
        chunk, fqn = item.tensor_data.chunk, item.index.fqn
        written += chunk.sizes.numel() * item.tensor_data.properties.dtype.itemsize
        planned.add(fqn)
        if fqn not in shards:
            continue
        offsets, sizes = exact_chunk(shards[fqn])
        local = list(shards[fqn].to_local().shape)
        if (list(chunk.offsets), list(chunk.sizes)) != (offsets, sizes) or local != sizes:
            mismatches.append(
                f"{fqn}: planned offsets {list(chunk.offsets)} sizes {list(chunk.sizes)}, local shard {local}; "
                f"exact share offsets {offsets} sizes {sizes}"
            )
    for fqn, t in sorted(shards.items()):
        if fqn not in planned and t.to_local().numel():
            mismatches.append(f"{fqn}: holds {t.to_local().numel()} elements on this rank but has no write item")
    return {
        "rank": world.rank,
        "world_size": world.size,
        "items": len(plan.items),
        "bytes": written,
        "sharded_tensors": len(shards),
        "mismatches": mismatches,
    }
