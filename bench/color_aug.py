"""Time of the batched colour augmentation (`extrema.data.augment.two_views`): the sync-free path against the old one.

    python bench/color_aug.py [--runs 21] [--device cpu] [--threads N]

The old path (kept in tests/test_augment.py as the reference) gathers each op's samples with `.nonzero()` and
skips empty groups with `numel()`: cheap on a CPU, a host sync each on CUDA (32 per step). The new path runs three
blends at every position and the hue shift once on the whole batch, selecting per sample, so it does more arithmetic
and never syncs. Both are timed in the same process, interleaved, on the same inputs (parameters drawn as the
recipe draws them), at the demo's size (batch 128, 3x32x32) and at 224 px batch 64; prints the median of --runs and
the ratio new/old.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from extrema.data.augment import color_jitter, sample_color_params, two_views

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the old path is kept once, as the tests' reference
from tests.test_augment import old_apply_color, old_normalize

SIZES = [("demo: batch 128, 3x32x32", 128, 32), ("batch 64, 3x224x224", 64, 224)]


def old_two_views(crops: Tensor, params: Tensor, color: bool) -> tuple[Tensor, Tensor]:
    x = crops.float().div_(255)
    if not color:
        view = old_normalize(x)
        return view, view
    return old_normalize(old_apply_color(x, params[:, 0])), old_normalize(old_apply_color(x, params[:, 1]))


# ------------------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")]
    return names[0] if names else "unknown"


def inputs(batch: int, size: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """uint8 crops and (B, 2, 10) colour parameters drawn as the loader draws them."""
    torch.manual_seed(0)
    crops = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    jitter = color_jitter()
    params = torch.stack([torch.stack([sample_color_params(jitter, crops[i]) for _ in range(2)]) for i in range(batch)])
    return crops.to(device), params.to(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=21, help="timed runs per path and size (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"CPU: {cpu_name()}; device: {where}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"median of {args.runs} runs, old and new interleaved")
    print(f"{'size':<28}{'old ms':>10}{'new ms':>10}{'new/old':>10}")
    for label, batch, size in SIZES:
        crops, params = inputs(batch, size, device)
        a, b = two_views(crops, params, True), old_two_views(crops, params, True)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "new and old views differ"
        paths = {
            "old": functools.partial(old_two_views, crops, params, True),
            "new": functools.partial(two_views, crops, params, True),
        }
        for _ in range(args.warmup):
            for fn in paths.values():
                fn()
        times: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.runs):
            for name, fn in paths.items():
                times[name].append(timed(fn, device))
        old, new = (statistics.median(times[name]) * 1e3 for name in ("old", "new"))
        print(f"{label:<28}{old:>10.2f}{new:>10.2f}{new / old:>10.2f}")


if __name__ == "__main__":
    main()
