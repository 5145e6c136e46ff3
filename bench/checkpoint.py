"""Checkpoint save/load throughput of a ViT-Base ExtreMA training state against the raw speed of the same disk.

    python bench/checkpoint.py [--arch vit_base] [--dir /tmp/extrema-bench-ckpt]

Measures, in one run: raw sequential write (with fsync) and read of a file as large as the state; DCP save and
load of the state (online + EMA target + predictor + AdamW moments) through the fsspec writer; the cost of the
durable commit (`ckpt.save`: shards, `.metadata` and directories fsynced) against DCP's plain writer with
`sync_files=False`, alternating the two `--rounds` times after an `os.sync()` each, medians compared; and the
training stall of a background (async) save against a blocking one, with a gloo process group of one rank.
Reads may come from the page cache for both raw and DCP; the ratio is what matters.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from rich.console import Console
from rich.table import Table
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

from extrema.models.extrema import ExtreMA
from extrema.spec import ModelSpec
from extrema.train import ckpt
from extrema.train.optim import build_adamw, param_groups
from extrema.train.safe_dcp import JsonSavePlanner


def state_bytes(state: dict) -> int:
    """Bytes of every tensor in a nested state dict."""
    total = 0
    for v in state.values():
        if isinstance(v, dict):
            total += state_bytes(v)
        elif isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


def raw_write_read(path: str, nbytes: int) -> tuple[float, float]:
    """Seconds to write (and fsync) then read back `nbytes` in 64 MiB chunks."""
    chunk = os.urandom(64 << 20)
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(max(1, nbytes // len(chunk))):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    write = time.perf_counter() - t
    t = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass
    return write, time.perf_counter() - t


def save_seconds(root: str, state: dict, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of blocking saves without fsync (DCP's writer, sync_files=False) and durable ones (`ckpt.save`),
    alternating, each after `os.sync()` so that neither pays for the other's dirty pages."""
    plain, durable = [], []
    for r in range(rounds):
        for times, name in ((plain, "plain"), (durable, "durable")):
            os.sync()
            t = time.perf_counter()
            if name == "plain":
                plain_writer = FsspecWriter(os.path.join(root, "plain", f"step-{r}"), sync_files=False)
                dcp.save(state, storage_writer=plain_writer, planner=JsonSavePlanner())
            else:
                ckpt.save(os.path.join(root, "durable"), r, state)
            times.append(time.perf_counter() - t)
            shutil.rmtree(os.path.join(root, name))
    return plain, durable


def main() -> None:
    """Run the measurements and print a table with ratios to the raw disk speed."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_base")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--rounds", type=int, default=3, help="saves of each kind in the durability comparison")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="extrema-bench-ckpt-")
    os.makedirs(root, exist_ok=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29655")
    dist.init_process_group("gloo", rank=0, world_size=1)

    model = ExtreMA(ModelSpec(arch=args.arch))
    opt = build_adamw(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()  # materialise the AdamW moments
    state = ckpt.training_state(model, opt, {"step": 1})
    nbytes = state_bytes(state)

    plain, durable = save_seconds(root, state, args.rounds)
    raw_w, raw_r = raw_write_read(os.path.join(root, "raw.bin"), nbytes)
    os.remove(os.path.join(root, "raw.bin"))
    t = time.perf_counter()
    ckpt.save(os.path.join(root, "ckpt"), 1, state)
    save_s = time.perf_counter() - t
    t = time.perf_counter()
    ckpt.restore(os.path.join(root, "ckpt"), model, opt, {"step": 0})
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    saver = ckpt.Saver(os.path.join(root, "ckpt"))
    saver.save(2, ckpt.training_state(model, opt, {"step": 2}), background=True)
    stall_s = time.perf_counter() - t
    saver.wait()
    async_total = time.perf_counter() - t

    gb = nbytes / 1e9
    table = Table(title=f"{args.arch} ExtreMA training state, {gb:.2f} GB, in {root}")
    for col in ("operation", "seconds", "GB/s", "vs raw disk"):
        table.add_column(col)
    table.add_row("raw sequential write + fsync", f"{raw_w:.2f}", f"{gb / raw_w:.2f}", "1.00x")
    table.add_row("DCP save (blocking, durable)", f"{save_s:.2f}", f"{gb / save_s:.2f}", f"{raw_w / save_s:.2f}x")
    table.add_row("raw sequential read", f"{raw_r:.2f}", f"{gb / raw_r:.2f}", "1.00x")
    table.add_row("DCP load + set_state_dict", f"{load_s:.2f}", f"{gb / load_s:.2f}", f"{raw_r / load_s:.2f}x")
    table.add_row("async save: training stall", f"{stall_s:.2f}", "", f"{stall_s / save_s:.2f}x of blocking")
    table.add_row("async save: until committed", f"{async_total:.2f}", f"{gb / async_total:.2f}", "")
    Console().print(table)
    p, d = statistics.median(plain), statistics.median(durable)
    sync = Table(title=f"durable commit against sync_files=False, medians of {args.rounds} alternating saves")
    for col in ("save", "seconds (each round)", "median", "GB/s", "ratio"):
        sync.add_column(col)
    sync.add_row(
        "DCP writer, sync_files=False", " ".join(f"{x:.2f}" for x in plain), f"{p:.2f}", f"{gb / p:.2f}", "1.00x"
    )
    sync.add_row(
        "ckpt.save (fsync'd)", " ".join(f"{x:.2f}" for x in durable), f"{d:.2f}", f"{gb / d:.2f}", f"{d / p:.2f}x"
    )
    Console().print(sync)
    dist.destroy_process_group()
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
