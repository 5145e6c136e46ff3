"""The optimised ExtreMA training step against the straightforward reference, on the same weights and batch.

    python bench/reference_step.py [--arch vit_nano] [--batch 64] [--ratio 0.9] [--masks 8] [--steps 5]

Reference: a Python loop over masks, attention written out by hand, per-parameter EMA and AdamW loops, fp32.
Optimised: all masks in one batched pass, SDPA, foreach EMA lerp, foreach AdamW, bf16 autocast (as the demo
runs on CPU; `--precision fp32` to compare at equal precision). Prints both losses and the speed ratio.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from rich.console import Console
from rich.table import Table

from extrema.models.extrema import ExtreMA, random_masks
from extrema.models.reference import reference_step, unfused_adamw
from extrema.spec import ModelSpec


def main() -> None:
    """Time both steps on identical inputs and print images/s, losses and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_nano")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ratio", type=float, default=0.9)
    ap.add_argument("--masks", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--mlp-dim", type=int, default=1024)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = ExtreMA(ModelSpec(arch=args.arch, mlp_dim=args.mlp_dim, drop_path_rate=0.0)).train()
    ref = copy.deepcopy(model)
    enc = model.online.encoder
    n = (enc.img_size // enc.patch_size) ** 2
    batches = [
        (torch.randn(args.batch, 3, enc.img_size, enc.img_size), torch.randn(args.batch, 3, enc.img_size, enc.img_size),
         random_masks(args.batch, n, args.masks, args.ratio, generator=torch.Generator().manual_seed(i)))
        for i in range(args.steps + 1)
    ]  # fmt: skip
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    ref_opt = unfused_adamw(ref, 1e-4)
    amp = args.precision == "bf16"

    def fast(x1: torch.Tensor, x2: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        model.update_target(0.99)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = model(x1, x2, v)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    results = {}
    for name, fn in (("reference", lambda *b: reference_step(ref, ref_opt, *b, 0.99)), ("optimised", fast)):
        fn(*batches[0])
        t = time.perf_counter()
        losses = [float(fn(*b)) for b in batches[1:]]
        results[name] = (args.batch * args.steps / (time.perf_counter() - t), losses)
    table = Table(title=f"{args.arch}, batch {args.batch}, {args.ratio:.0%} x {args.masks} masks, CPU, "
                  f"{torch.get_num_threads()} threads")  # fmt: skip
    for col in ("step", "images/s", "losses", "vs reference"):
        table.add_column(col)
    base = results["reference"][0]
    for name, (ips, losses) in results.items():
        table.add_row(name, f"{ips:,.0f}", " ".join(f"{x:.4f}" for x in losses), f"{ips / base:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
