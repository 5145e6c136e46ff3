"""Images/s of one ExtreMA training step against the BYOL baseline (same encoder on full, unmasked views).

    python bench/pretrain_step.py [--arch vit_nano] [--batch 128] [--precision bf16] [--steps 10]
    python bench/pretrain_step.py --arch vit_base --batch 256 --compile --memory     # on a GPU

Every configuration is measured in the same process on random tensors (the model step only: EMA update,
online forward + backward on all masks, target forward, AdamW; the data pipeline is measured elsewhere).
Prints images/s, the ratio to the baseline, model FLOPs utilisation against --peak-tflops on GPU, and peak
memory per image with --memory.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from extrema.models.extrema import ExtreMA, random_masks
from extrema.spec import ModelSpec
from extrema.train.optim import build_adamw, param_groups

CONFIGS: list[tuple[str, float, int]] = [
    ("BYOL baseline (full views)", 0.0, 0),
    ("ExtreMA 80% x 5", 0.8, 5),
    ("ExtreMA 90% x 8", 0.9, 8),
]


def encoder_flops(dim: int, depth: int, tokens: int, sequences: int) -> float:
    """Forward matmul FLOPs of `sequences` sequences of `tokens` tokens through the self-attention stack."""
    per_layer = 24 * tokens * dim * dim + 4 * tokens * tokens * dim
    return sequences * depth * per_layer


def step_flops(spec: ModelSpec, ratio: float, masks: int) -> float:
    """Model FLOPs of one training step per image: online fwd+bwd (3x) on the masks, target forward (1x)."""
    dim, depth, _ = spec.dims
    n = spec.num_patches
    k = int(n * (1 - ratio)) if masks else n
    m = masks or 1
    online = encoder_flops(dim, depth, k, m)
    heads = 2 * m * (dim * spec.mlp_dim + spec.mlp_dim**2 + spec.mlp_dim * spec.proj_dim) * 2
    target = encoder_flops(dim, depth, n, 1) + heads / (2 * m)
    return 3 * (online + heads) + target


def measure(
    model: ExtreMA, batch: int, ratio: float, masks: int, steps: int, amp: torch.dtype | None, compiled: bool
) -> tuple[float, float]:
    """(images/s, peak GB) of full training steps after warm-up steps."""
    device = next(model.parameters()).device
    opt = build_adamw(param_groups(model, 0.1), lr=1e-4, betas=(0.9, 0.95))
    size = model.online.encoder.img_size
    x1 = torch.randn(batch, 3, size, size, device=device)
    x2 = torch.randn_like(x1)
    n = (size // model.online.encoder.patch_size) ** 2
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        visible = random_masks(batch, n, masks, ratio, device=device) if masks else None
        model.update_target(0.99)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = forward(x1, x2, visible)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3 if compiled else 2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
    return batch * steps / (time.perf_counter() - t), peak


def main() -> None:
    """Run every configuration and print images/s with the ratio to the baseline."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_nano")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mlp-dim", type=int, default=None, help="projector/predictor hidden width (spec default 4096)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--memory", action="store_true", help="report peak GPU memory per image")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200 SXM)")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = torch.bfloat16 if args.precision == "bf16" else None
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    extra = {} if args.mlp_dim is None else {"mlp_dim": args.mlp_dim}
    spec = ModelSpec(arch=args.arch, drop_path_rate=0.0, **extra)
    model = ExtreMA(spec).to(device).train()
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = f"{args.arch} batch {args.batch} {args.precision}{' compiled' if args.compile else ''} on {name}"
    table = Table(title=title)
    for col in ("step", "images/s", "vs baseline", "TFLOP/s", "MFU", "peak GB", "MB/image"):
        table.add_column(col)
    base = None
    for label, ratio, masks in CONFIGS:
        ips, peak = measure(model, args.batch, ratio, masks, args.steps, amp, args.compile)
        base = base or ips
        tflops = ips * step_flops(spec, ratio, masks) / 1e12
        mfu = f"{tflops / args.peak_tflops:.1%}" if device.type == "cuda" else "-"
        mem = (f"{peak:.1f}", f"{peak * 1e3 / args.batch:.0f}") if args.memory and device.type == "cuda" else ("-", "-")
        table.add_row(label, f"{ips:,.0f}", f"{ips / base:.2f}x", f"{tflops:.2f}", mfu, *mem)
    Console().print(table)


if __name__ == "__main__":
    main()
