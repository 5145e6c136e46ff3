"""Two parts of the pretraining step on a CPU, each against the implementation it replaced, in the same run.

    python bench/step_parts.py [--arch vit_small] [--repeats 20]

Attention, forward + backward, at the ViT-S/16 step's shapes (the masked online branch: 80 sequences of 40 tokens;
the target's full views: 16 of 197): torch's fused kernel, its math backend, and two products around an fp32 softmax
(`extrema.models.attention.products`, `attend`'s bf16 path on a CPU), in fp32 and bf16. AdamW over the model's
parameter groups (encoder, projector and predictor): foreach (one op per tensor per pass on a CPU) against torch's
fused kernel, and the EMA update (foreach lerp). Medians; ratios against the first column of each table.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.roofline import median_s
from extrema.models import attention
from extrema.models.extrema import ExtreMA
from extrema.spec import ModelSpec
from extrema.train.optim import param_groups

SHAPES = ((80, 6, 40, 64), (16, 6, 197, 64))


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall milliseconds of `fn` (`bench.roofline.median_s`)."""
    return 1e3 * median_s(fn, repeats)


def fwd_bwd(
    fn: Callable[..., torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype, backend: SDPBackend | None = None
) -> Callable[[], None]:
    """Forward and backward of `fn(q, k, v)` on fresh random tensors of `shape` (under `backend` when given)."""
    q, k, v = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad = torch.randn(*shape, dtype=dtype)

    def run() -> None:
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            fn(q, k, v).backward(grad)

    return run


def attention_rows(repeats: int) -> list[tuple[str, float, float, float]]:
    """(shape and dtype, fused ms, math ms, products ms), forward + backward."""
    rows = []
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            sdpa = F.scaled_dot_product_attention
            fused = median_ms(fwd_bwd(sdpa, shape, dtype, SDPBackend.FLASH_ATTENTION), repeats)
            math = median_ms(fwd_bwd(sdpa, shape, dtype, SDPBackend.MATH), repeats)
            products = median_ms(fwd_bwd(attention.products, shape, dtype), repeats)
            rows.append((f"{shape}, {str(dtype).removeprefix('torch.')}", fused, math, products))
    return rows


def optimizer_rows(arch: str, repeats: int) -> tuple[float, float, float, float]:
    """(parameters in millions, foreach AdamW ms, fused AdamW ms, EMA lerp ms) for the model of `arch`."""
    torch.manual_seed(0)
    model = ExtreMA(ModelSpec(arch=arch, drop_path_rate=0.0))
    params = [p for g in param_groups(model, 0.05) for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p)
    timings = []
    for kind in ({"foreach": True}, {"fused": True}):  # fresh groups: an optimizer writes its defaults into them
        opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), **kind)
        timings.append(median_ms(opt.step, repeats))
    target: list[torch.Tensor] = list(model.target.parameters())
    online = [p.detach() for p in model.online.parameters()]
    ema = median_ms(lambda: torch._foreach_lerp_(target, online, 0.01), repeats)
    return sum(p.numel() for p in params) / 1e6, timings[0], timings[1], ema


def main() -> None:
    """Print both tables."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_small")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    print("\n| attention fwd + bwd (batch, heads, tokens, d) | fused | math | two products, fp32 softmax |")
    print("|---|---|---|---|")
    for name, fused, math, products in attention_rows(args.repeats):
        print(f"| {name} | {fused:.1f} ms | {math:.1f} ms ({fused / math:.2f}x) | {products:.1f} ms "
              f"({fused / products:.2f}x) |")  # fmt: skip
    millions, foreach, fused, ema = optimizer_rows(args.arch, args.repeats)
    print(f"\nAdamW step over {millions:.1f} M parameters ({args.arch}): foreach {foreach:.1f} ms, "
          f"fused {fused:.1f} ms ({foreach / fused:.2f}x); EMA update (foreach lerp) {ema:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
