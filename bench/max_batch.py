"""Largest ExtreMA batch that fits on this GPU (bf16, one process): doubles, then bisects, until out of memory.

python bench/max_batch.py --arch vit_base --ratio 0.8 --masks 5
"""

from __future__ import annotations

import argparse

import torch

from extrema.models.extrema import ExtreMA, random_masks
from extrema.spec import ModelSpec
from extrema.train.optim import build_adamw, param_groups


def fits(model: ExtreMA, opt: torch.optim.Optimizer, batch: int, ratio: float, masks: int) -> bool:
    """Whether one full training step at this batch size runs without running out of memory."""
    size = model.online.encoder.img_size
    n = (size // model.online.encoder.patch_size) ** 2
    try:
        x = torch.randn(batch, 3, size, size, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, x, random_masks(batch, n, masks, ratio, device="cuda"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return True
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return False
    finally:
        torch.cuda.empty_cache()


def main() -> None:
    """Search the largest batch and print it with the card's memory."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_base")
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--masks", type=int, default=5)
    args = ap.parse_args()
    model = ExtreMA(ModelSpec(arch=args.arch, drop_path_rate=0.0)).cuda().train()
    opt = build_adamw(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    lo, hi = 0, 256
    while fits(model, opt, hi, args.ratio, args.masks) and hi < 65536:
        lo, hi = hi, hi * 2
    while hi - lo > max(16, lo // 16):
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(model, opt, mid, args.ratio, args.masks) else (lo, mid)
    total = torch.cuda.get_device_properties(0).total_memory / 1e9
    card = torch.cuda.get_device_name()
    print(f"{args.arch} {args.ratio:.0%} x {args.masks}: largest batch that fits ~{lo} on {card} ({total:.0f} GB)")


if __name__ == "__main__":
    main()
