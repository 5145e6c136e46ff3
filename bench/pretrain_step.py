"""Images/s of one ExtreMA training step against the BYOL baseline (same encoder on full, unmasked views).

    python bench/pretrain_step.py [--arch vit_nano] [--batch 128] [--precision bf16] [--steps 10]

Every configuration is measured in the same process, on synthetic tensors (the model step only; the data
pipeline is measured by bench/dataloader.py). Prints a table of images/s and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from extrema.models.extrema import ExtreMA, random_masks
from extrema.optim import build_adamw, param_groups
from extrema.spec import ModelSpec

CONFIGS: list[tuple[str, float, int]] = [
    ("BYOL baseline (full views)", 0.0, 0),
    ("ExtreMA 80% x 5", 0.8, 5),
    ("ExtreMA 90% x 8", 0.9, 8),
]


def measure(model: ExtreMA, batch: int, ratio: float, masks: int, steps: int, amp: torch.dtype | None) -> float:
    """Images/s of full training steps (EMA update, forward, backward, AdamW) after two warm-up steps."""
    device = next(model.parameters()).device
    opt = build_adamw(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    x1 = torch.randn(batch, 3, model.online.encoder.img_size, model.online.encoder.img_size, device=device)
    x2 = torch.randn_like(x1)
    n = (model.online.encoder.img_size // model.online.encoder.patch_size) ** 2

    def step() -> None:
        visible = random_masks(batch, n, masks, ratio, device=device) if masks else None
        model.update_target(0.99)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = model(x1, x2, visible)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t)


def main() -> None:
    """Run every configuration and print images/s with the ratio to the baseline."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_nano")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mlp-dim", type=int, default=1024)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if args.precision == "bf16" else None
    torch.manual_seed(0)
    model = ExtreMA(ModelSpec(arch=args.arch, mlp_dim=args.mlp_dim, drop_path_rate=0.0)).to(device).train()
    table = Table(
        title=f"{args.arch} batch {args.batch} {args.precision} on {device} ({torch.get_num_threads()} threads)"
    )
    for col in ("step", "images/s", "vs baseline"):
        table.add_column(col)
    base = None
    for name, ratio, masks in CONFIGS:
        ips = measure(model, args.batch, ratio, masks, args.steps, amp)
        base = base or ips
        table.add_row(name, f"{ips:,.0f}", f"{ips / base:.2f}x")
    Console().print(table)


if __name__ == "__main__":
    main()
