"""The pretraining step against the machine's own matmul peak: FLOP rate, fraction of peak, and where the rest goes.

    python bench/roofline.py                                   # ViT-S/16 224 px, batch 8, 80% x 5 masks, bf16 + fp32
    python bench/roofline.py --arch vit_nano --size 32 --patch 4 --batch 128 --ratio 0.9 --masks 8
    python bench/roofline.py --arch vit_base --batch 4 --precision bf16

What is counted: torch's FlopCounterMode over one whole training step (EMA update, online branch over all masks
forward and backward, target forward, projector and predictor, loss, AdamW): the matmuls, convolutions and
attention it knows (2 FLOPs per multiply-add; the CPU's fused attention kernel by the GPU kernels' formula, which
torch's counter lacks, so that fp32 and bf16 count alike); element-wise work, normalisation, the EMA and AdamW
count zero.
The peak is a plain square matmul of the step's dtype on the same threads (`--matmul` its side), timed in the same
process right before and after the steps, so the load of the machine touches both alike. Times are medians.
The profile groups torch.profiler's self CPU time of one step by operator kind.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table

from extrema.check.estimate import flop_counter
from extrema.models.extrema import ExtreMA, random_masks
from extrema.spec import ModelSpec
from extrema.train.optim import build_adamw, param_groups

KINDS: list[tuple[str, re.Pattern[str]]] = [
    ("attention", re.compile(r"attention|sdpa|flash|softmax|_efficient", re.I)),
    ("matmul", re.compile(r"\b(aten::)?(mm|bmm|addmm|matmul|linear|baddbmm|addbmm|_convolution|convolution\w*)\b")),
    ("optimizer", re.compile(r"_foreach_|adam", re.I)),
    ("normalisation", re.compile(r"norm", re.I)),
    ("casts", re.compile(r"\b(aten::)?(to|_to_copy|copy_|_autocast_to\w*|type_as)\b")),
    ("gather/scatter", re.compile(r"gather|scatter|index|take_along|sort|argsort|cat\b|stack|narrow|slice", re.I)),
    ("activation", re.compile(r"gelu|relu|silu|tanh", re.I)),
    ("elementwise", re.compile(r"\b(aten::)?(add|mul|sub|div|lerp|addcmul|addcdiv|sqrt|pow|neg|exp|sum|mean|clone)")),
    ("allocation", re.compile(r"empty|zeros|ones|fill_|zero_|resize", re.I)),
]


def kind_of(name: str) -> str:
    """The kind of a profiled operator by its name (the first pattern of `KINDS` that matches), or `other`."""
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "other")


def make_step(model: ExtreMA, batch: int, ratio: float, masks: int, amp: torch.dtype | None) -> Callable[[], None]:
    """One full training step on fixed random images (fresh masks each call), as pretraining runs it."""
    opt = build_adamw(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    size = model.online.encoder.img_size
    x1, x2 = torch.randn(batch, 3, size, size), torch.randn(batch, 3, size, size)
    n = (size // model.online.encoder.patch_size) ** 2

    def step() -> None:
        visible = random_masks(batch, n, masks, ratio) if masks else None
        model.update_target(0.99)
        with torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = model(x1, x2, visible)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def median_s(fn: Callable[[], object], repeats: int) -> float:
    """The median wall time of `fn` over `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(side: int, dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of a plain `side` x `side` matmul in `dtype` on this process's threads (median)."""
    a, b = torch.randn(side, side).to(dtype), torch.randn(side, side).to(dtype)
    return 2 * side**3 / median_s(lambda: torch.mm(a, b), repeats)


def step_flops(step: Callable[[], None]) -> int:
    """The FLOPs torch's counter counts in one call of `step`, the CPU's fused attention included (`flop_counter`)."""
    with flop_counter() as counter:
        step()
    return counter.get_total_flops()


def profile_kinds(step: Callable[[], None]) -> dict[str, float]:
    """Seconds of self CPU time of one step per operator kind."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        out[kind_of(event.key)] += event.self_cpu_time_total / 1e6
    return dict(out)


def main() -> None:
    """Measure each precision's step against its matmul peak and print the roofline and profile tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_small")
    ap.add_argument("--size", type=int, default=None, help="image side; the preset's when unset")
    ap.add_argument("--patch", type=int, default=None, help="patch side; the preset's when unset")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--masks", type=int, default=5)
    ap.add_argument("--precision", choices=["bf16", "fp32", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--matmul", type=int, default=2048, help="side of the square matmul that measures the peak")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    spec = ModelSpec(arch=args.arch, img_size=args.size, patch_size=args.patch, drop_path_rate=0.0)
    model = ExtreMA(spec).train()
    precisions = ["bf16", "fp32"] if args.precision == "both" else [args.precision]
    shape = f"{spec.resolved_img_size}px/{spec.resolved_patch_size}"
    what = f"{args.arch} {shape} batch {args.batch}, {args.ratio:.0%} x {args.masks} masks"
    console = Console()
    roof = Table(title=f"{what} on CPU, {torch.get_num_threads()} threads")
    for col in ("precision", "GFLOP/step", "step s", "GFLOP/s", "matmul GFLOP/s", "of peak"):
        roof.add_column(col, justify="right")
    profiles: dict[str, dict[str, float]] = {}
    for precision in precisions:
        amp = torch.bfloat16 if precision == "bf16" else None
        dtype = amp or torch.float32
        step = make_step(model, args.batch, args.ratio, args.masks, amp)
        flops = step_flops(step)
        before = matmul_peak(args.matmul, dtype, args.repeats)
        seconds = median_s(step, args.repeats)
        peak = max(before, matmul_peak(args.matmul, dtype, args.repeats))
        rate = flops / seconds
        roof.add_row(
            precision,
            f"{flops / 1e9:.1f}",
            f"{seconds:.3f}",
            f"{rate / 1e9:.0f}",
            f"{peak / 1e9:.0f}",
            f"{rate / peak:.0%}",
        )
        if not args.no_profile:
            profiles[precision] = profile_kinds(step)
    console.print(roof)
    if profiles:
        kinds = sorted(
            {k for p in profiles.values() for k in p}, key=lambda k: -max(p.get(k, 0) for p in profiles.values())
        )
        table = Table(title="self CPU time of one step by operator kind (share of the profiled step)")
        table.add_column("kind")
        for precision in profiles:
            table.add_column(precision, justify="right")
        for kind in kinds:
            row = []
            for p in profiles.values():
                total = sum(p.values()) or 1.0
                row.append(f"{p.get(kind, 0.0) * 1e3:.0f} ms ({p.get(kind, 0.0) / total:.0%})")
            table.add_row(kind, *row)
        console.print(table)


if __name__ == "__main__":
    main()
