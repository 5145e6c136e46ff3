"""Predicted against measured (issue 33): the check's peak memory and step time of one pretraining step against the
same step run for real on this machine's GPU, so that the first run on a GPU calibrates the check.

    python bench/check_vs_gpu.py                                  # ViT-B 256 and ViT-S 512 per GPU, 80% x 5
    python bench/check_vs_gpu.py --arch vit_base --batch 128 --device cpu   # the same comparison's plumbing on a CPU
    python bench/check_vs_gpu.py --detect jobs/detect_coco.yaml   # one GPU's Mask R-CNN step of the COCO recipe

With --detect, the sweep file's first detect configuration on one GPU (its global batch cut to one GPU's share,
two images for the COCO recipe): the check's prediction at its caps against a real step on images of the caps'
size, each with the caps' objects laid out on a grid, and the proposals, RoIs and mask RoIs the real step used (a
random-init detector rarely reaches the mask RoIs' cap: the prediction is then above the measure by the mask
head's share).

For each configuration (one process, as `pretrain` runs on one GPU): the prediction of `python -m extrema.check`
with fake tensors on the CPU (CUDA autocast followed; what `extrema-launch check` uses) and, with a GPU here, with
fake CUDA tensors; the real step's peak (`torch.cuda.max_memory_allocated` over one steady step, after warm-up
steps) and its time (median of timed steps); their ratios; and the utilisation of peak bf16 FLOP/s the measured
time implies (the check assumes extrema.check.devices.DEFAULT_UTILIZATION). On a CPU only the times are compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import nn

from extrema.check.detect import caps, data_bounds, image_sizes
from extrema.check.devices import DEFAULT_UTILIZATION, DEVICES, Device
from extrema.models.extrema import ExtreMA, random_masks
from extrema.spec import Experiment
from extrema.stages.detect import LOSSES, build_model, detect_optimizer
from extrema.stages.pretrain import color_on_device, train_step
from extrema.train.dist import World, autocast_dtype, wrap
from extrema.train.optim import build_adamw, param_groups, scaled_lr

GIB = 2**30


def experiment(arch: str, batch: int, ratio: float, masks: int) -> Experiment:
    """One GPU's pretraining at this batch, as the recipes set it (cait, colour augmentation, bf16 on GPUs)."""
    return Experiment.model_validate(
        {
            "model": {"arch": arch, "cls_token": "cait", "drop_path_rate": 0.1},
            "data": {"dataset": "synthetic", "augmentation": "spatial_consistent_color"},
            "stages": ["pretrain"],
            "pretrain": {"batch_size": batch, "masking": {"ratio": ratio, "num_masks": masks}},
        }
    )


def gpu_type() -> Device | None:
    """The device table's entry for this GPU (by its name and memory); None on a CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    memory_gb = torch.cuda.get_device_properties(0).total_memory / GIB
    for key in ("H200", "H100", "L40S", "V100"):
        if key in name:
            return DEVICES[key]
    if "A100" in name:
        return DEVICES["A100-80GB" if memory_gb > 50 else "A100-40GB"]
    return None


def predicted(
    exp: Experiment, target: str, fake_device: str, device: Device | None, stage: str = "pretrain"
) -> dict[str, Any]:
    """The check's JSON for one process on `target`, its fake tensors on `fake_device`."""
    cmd = [sys.executable, "-m", "extrema.check", "-", "--json", "--target", target, "--stage", stage]
    cmd += ["--fake-device", fake_device] if stage == "pretrain" else []
    if device is not None:
        cmd += ["--gpu-type", device.name]
    proc = subprocess.run(cmd, input=exp.model_dump_json(), capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise SystemExit(f"extrema.check failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def measured(exp: Experiment, device: torch.device, warmup: int, steps: int) -> tuple[int | None, float]:
    """(peak bytes of one steady step or None on a CPU, median seconds per step) of the real step, as the stage
    builds and runs it in one process."""
    p = exp.pretrain
    world = World(0, 1, 0, device)
    amp = autocast_dtype(p.precision, device)
    torch.manual_seed(0)
    model = ExtreMA(exp.model).to(device)
    loss_module, core = wrap(model, world, p.strategy, bf16=device.type == "cuda" and amp is not None)
    trainable = nn.ModuleDict({"online": core.online, "predictor": core.predictor})
    groups = param_groups(trainable, p.weight_decay, no_decay_names=("pos_embed", "cls_token"))
    optimizer = build_adamw(groups, lr=scaled_lr(p.base_lr, p.batch_size), betas=p.betas)
    b, size, m = p.batch_size, exp.model.resolved_img_size, p.masking
    device_color = color_on_device(exp, device)
    masks = random_masks(b, exp.model.num_patches, m.num_masks, m.ratio).transpose(0, 1).contiguous()
    if device_color:
        batch = (torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8), torch.zeros(b, 2, 10), masks)
    else:
        batch = (torch.randn(b, 3, size, size), torch.randn(b, 3, size, size), masks)
    color = exp.data.augmentation == "spatial_consistent_color"
    model.train()

    def step() -> None:
        core.update_target(p.ema_momentum)
        train_step(loss_module, optimizer, batch, p, world, amp, device_color, color)

    return timed(step, device, warmup, steps)


def timed(step: Any, device: torch.device, warmup: int, steps: int) -> tuple[int | None, float]:
    """(peak bytes of one steady call of `step` or None on a CPU, median seconds per call), after warm-up calls."""

    def once() -> float:
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    peak = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        once()
        peak = torch.cuda.max_memory_allocated()
    return peak, statistics.median(once() for _ in range(steps))


def detect_experiment(path: str) -> Experiment:
    """The sweep file's first run with a detect stage, its detect batch cut to one GPU's share of it (the file's
    detect resources: nodes x processes per node)."""
    from launch.sweepfile.expand import load_runs

    sweep, runs = load_runs(path)
    exp = next(r.experiment for r in runs if "detect" in r.stages)
    r = sweep.launcher.resources_for("detect")
    share = max(1, exp.detect.batch_size // (r.nodes * r.processes_per_node))
    return exp.model_copy(update={"detect": exp.detect.model_copy(update={"batch_size": share})})


def measured_detect(exp: Experiment, device: torch.device, warmup: int, steps: int) -> tuple[Any, ...]:
    """(peak bytes or None, median seconds, proposals / RoIs / mask RoIs per image seen) of the real detect step on
    images of the caps' size with the caps' objects each, as the stage runs it on one GPU."""
    d = exp.detect
    classes, objects, aspect = data_bounds(d)
    amp = autocast_dtype(d.precision, device)
    model = build_model(exp, d, classes, None, amp).to(device)
    c = caps(d, model, d.batch_size, objects, aspect)
    optimizer = detect_optimizer(model, d)
    sizes = image_sizes(c)
    side = max(4, int(c.short / (objects**0.5 + 1)))  # the objects on a grid inside the shorter side
    corners = [((i % max(1, c.short // side)) * side, (i // max(1, c.short // side)) * side) for i in range(objects)]
    extent = int(side * 0.8)
    boxes = torch.tensor([[x, y, x + extent, y + extent] for x, y in corners], dtype=torch.float32, device=device)
    labels = torch.ones(objects, dtype=torch.int64, device=device)
    images, targets = [], []
    for h, w in sizes:  # each image its own masks, as the loader hands them
        masks = torch.zeros(objects, h, w, dtype=torch.uint8, device=device)
        for mask, (x, y) in zip(masks, corners):
            mask[y : y + extent, x : x + extent] = 1
        images.append(torch.rand(exp.model.in_chans, h, w, device=device))
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    seen: dict[str, list[int]] = {}
    model.rpn.register_forward_hook(lambda m, i, o: seen.update(proposals=[len(p) for p in o[0]]))
    model.roi_heads.box_roi_pool.register_forward_hook(lambda m, i, o: seen.update(rois=[len(p) for p in i[1]]))
    model.roi_heads.mask_roi_pool.register_forward_hook(lambda m, i, o: seen.update(masks=[len(p) for p in i[1]]))
    model.train()

    def step() -> None:
        losses = model(images, targets)
        sum(losses[k] for k in LOSSES).backward()  # type: ignore[union-attr]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    peak, seconds = timed(step, device, warmup, steps)
    return peak, seconds, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="*", default=["vit_base", "vit_small"])
    ap.add_argument("--batch", nargs="*", type=int, default=[256, 512], help="images per GPU, one per --arch")
    ap.add_argument("--ratio", type=float, default=0.8)
    ap.add_argument("--masks", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--detect", metavar="SWEEP_FILE", help="compare one GPU's detect step of this sweep file instead")
    args = ap.parse_args()
    device = torch.device(args.device)
    table = gpu_type() if device.type == "cuda" else None
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name} (table entry: {table.name if table else 'none'}); check's utilisation {DEFAULT_UTILIZATION}")
    if args.detect:
        exp = detect_experiment(args.detect)
        peak, seconds, seen = measured_detect(exp, device, args.warmup, args.steps)
        r = predicted(exp, device.type, "cpu", table, "detect")
        pred_peak, pred_s = r["memory"]["peak"], r.get("step_seconds")
        print(f"detect {exp.model.arch}, {exp.detect.batch_size} images a GPU; caps {r['caps']}; real step used {seen}")
        print(f"peak GiB predicted {pred_peak / GIB:.2f}, measured " + ("-" if peak is None else f"{peak / GIB:.2f}"))
        print(f"s/step predicted {'-' if pred_s is None else f'{pred_s:.4f}'}, measured {seconds:.4f}")
        if table:
            print(f"MFU {r['flops_per_rank'] / (seconds * table.bf16_flops):.3f}")
        return
    header = "arch       batch  fake  pred peak GiB  meas peak GiB  meas/pred  pred s/step  meas s/step  meas/pred  MFU"
    print(header)
    for arch, batch in zip(args.arch, args.batch):
        exp = experiment(arch, batch, args.ratio, args.masks)
        peak, seconds = measured(exp, device, args.warmup, args.steps)
        fakes = ["cpu", "cuda"] if device.type == "cuda" else ["cpu"]
        for fake in fakes:
            r = predicted(exp, device.type, fake, table)
            pred_peak, pred_s = r["memory"]["peak"], r.get("step_seconds")
            mfu = r["flops_per_rank"] / (seconds * table.bf16_flops) if table else None
            cells = [
                f"{arch:<10} {batch:>5}  {fake:<4}",
                f"{pred_peak / GIB:>13.2f}",
                f"{'-':>13}" if peak is None else f"{peak / GIB:>13.2f}",
                f"{'-':>9}" if peak is None else f"{peak / pred_peak:>9.3f}",
                f"{'-':>11}" if pred_s is None else f"{pred_s:>11.4f}",
                f"{seconds:>11.4f}",
                f"{'-':>9}" if pred_s is None else f"{seconds / pred_s:>9.3f}",
                "-" if mfu is None else f"{mfu:.3f}",
            ]
            print("  ".join(cells), flush=True)


if __name__ == "__main__":
    main()
