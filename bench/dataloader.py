"""Pretraining data pipeline throughput: images/s of the two-view loader against the training step's images/s.

    python bench/dataloader.py [--dataset fashion_mnist] [--workers 1] [--batch 128] [--steps 30]

Measures, in one run: the per-sample transform on one core (host colour jitter, and crop + parameter draw only
for the on-device colour path), the DataLoader with --workers workers, the batched on-device colour stage, and one
training step of --arch at the same batch for comparison. Reports images/s per CPU core for the per-sample paths.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from extrema.data import datasets, loaders, transforms
from extrema.data.augment import two_views
from extrema.models.extrema import ExtreMA, random_masks
from extrema.spec import DataSpec, ModelSpec
from extrema.stages.pretrain import SampleMasks


def per_sample(views: loaders.PretrainViews, n: int) -> float:
    """Images/s of __getitem__ in this process (one core)."""
    t = time.perf_counter()
    for i in range(n):
        views[(0, i)]
    return n / (time.perf_counter() - t)


def loader_rate(views: loaders.PretrainViews, batch: int, steps: int, workers: int) -> float:
    """Images/s of the DataLoader over `steps` batches after the first."""
    sampler = loaders.StepBatchSampler(len(views), batch, 0, 0, steps + 1)
    it = iter(loaders.step_loader(views, sampler, workers))
    next(it)
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    """Print the table of images/s."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="fashion_mnist")
    ap.add_argument("--root", default=None)
    ap.add_argument("--arch", default="vit_nano")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    spec = ModelSpec(arch=args.arch, mlp_dim=1024, drop_path_rate=0.0)
    base = datasets.build_dataset(DataSpec(dataset=args.dataset, root=args.root), "train")
    masks = SampleMasks(spec.num_patches, 8, 0.9, "disjoint")
    size = spec.resolved_img_size
    host = loaders.PretrainViews(base, transforms.TwoViewTransform(size, "spatial_consistent_color"), 0, masks)
    dev = loaders.PretrainViews(
        base, transforms.TwoViewTransform(size, "spatial_consistent_color", device_color=True), 0, masks
    )
    rows = [
        ("per sample, colour on host (1 core)", per_sample(host, 500)),
        ("per sample, crop + colour parameters (1 core)", per_sample(dev, 500)),
        (
            f"DataLoader, colour on host, {args.workers} worker(s)",
            loader_rate(host, args.batch, args.steps, args.workers),
        ),
        (f"DataLoader, crop only, {args.workers} worker(s)", loader_rate(dev, args.batch, args.steps, args.workers)),
    ]
    crops, params, _ = next(iter(loaders.step_loader(dev, loaders.StepBatchSampler(len(base), args.batch, 0, 0, 1), 0)))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    crops, params = crops.to(device), params.to(device)
    two_views(crops, params, True)
    t = time.perf_counter()
    for _ in range(5):
        two_views(crops, params, True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    rows.append((f"batched colour on {device.type}", 5 * args.batch / (time.perf_counter() - t)))
    model = ExtreMA(spec).to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    v1, v2 = two_views(crops, params, True)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(v1, v2, random_masks(args.batch, spec.num_patches, 8, 0.9, device=device))
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    t = time.perf_counter()
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_rate = 3 * args.batch / (time.perf_counter() - t)
    table = Table(title=f"{args.dataset} -> {size}px two views + 90% x 8 masks, batch {args.batch}")
    for col in ("stage", "images/s", "vs training step"):
        table.add_column(col)
    for name, rate in rows:
        table.add_row(name, f"{rate:,.0f}", f"{rate / step_rate:.2f}x")
    table.add_row(f"training step {args.arch} bf16 on {device.type}", f"{step_rate:,.0f}", "1.00x")
    Console().print(table)


if __name__ == "__main__":
    main()
