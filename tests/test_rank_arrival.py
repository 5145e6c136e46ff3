"""A rank that starts later than the collective timeout allows (a retry's fresh node unpacking the code) does not end
the stage: every rank waits for all others in the process group's store before the first collective
(`extrema.train.dist.wait_for_all`), and rank 0 names a rank that never comes. Two real gloo processes, a 1 s
collective timeout."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from extrema.train.dist import RanksMissing, wait_for_all
from launch.backends.ray.head import free_ports

TIMEOUT_S = 1.0
LATE_S = 3 * TIMEOUT_S


def worker(rank: int, port: int, out: str, gate: bool, limit_s: float, never: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=TIMEOUT_S))
    said: dict[str, object] = {}
    try:
        if rank == 1:
            time.sleep(LATE_S * (1.5 if never else 1))
        if rank == 1 and never:
            said = {"left": True}  # ends without reaching the start: a rank that never came
        elif gate:
            wait_for_all("test/start", limit_s)
        if not (rank == 1 and never):
            flag = torch.tensor([float(rank == 0) * 7.0])
            dist.broadcast(flag, src=0)
            said = {"ok": flag.item()}
    except Exception as e:
        said = {"error": type(e).__name__, "message": str(e)}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(said, f)
    dist.destroy_process_group()


def run_pair(tmp_path, gate: bool, limit_s: float = 600.0, never: bool = False) -> dict[int, dict]:
    out = str(tmp_path / "said")
    mp.spawn(worker, args=(free_ports(1)[0], out, gate, limit_s, never), nprocs=2, join=True)
    return {r: json.loads(open(f"{out}.{r}").read()) for r in (0, 1)}


def test_a_rank_later_than_the_collective_timeout_joins_the_first_collective(tmp_path) -> None:
    said = run_pair(tmp_path, gate=True)
    assert said == {0: {"ok": 7.0}, 1: {"ok": 7.0}}


def test_without_the_gate_the_same_late_rank_ends_rank_0_at_the_collective_timeout(tmp_path) -> None:
    said = run_pair(tmp_path, gate=False)
    assert said[0].get("error") == "RuntimeError", said  # what the gate is for: the broadcast timed out on rank 0


def test_rank_0_names_a_rank_that_never_starts(tmp_path) -> None:
    said = run_pair(tmp_path, gate=True, limit_s=LATE_S, never=True)
    assert said[0]["error"] == RanksMissing.__name__, said
    assert said[0]["message"].startswith(f"ranks 1 (of 2) did not start within {LATE_S:g} s"), said
    assert said[1] == {"left": True}
