"""What divergence detection costs a training step: the pretraining step of a small ViT with the end of step as the
stages run it, `on_nonfinite: fail` (a device-side flag per step, a parameter check at log steps) and `skip` (a
finiteness check of loss and gradients with a host sync per step), against the same step with no check at all.

    python bench/nonfinite.py [--arch vit_nano] [--batch 64] [--steps 40] [--log-every 20] [--repeats 3]

One process, random views on the CPU (or the GPU when there is one); the three variants are interleaved, each
repeat runs every variant for --steps steps, and the median per-step time of each is printed with its ratio to the
unchecked step.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time

import torch

from extrema.models.extrema import ExtreMA, random_masks
from extrema.spec import ModelSpec
from extrema.train.dist import Preemption, World
from extrema.train.optim import build_adamw, param_groups
from extrema.train.step_end import Cadence, LoopState, StepEnd


def run(mode: str | None, args: argparse.Namespace, world: World) -> float:
    """Seconds per step of `args.steps` steps with the given on_nonfinite mode (None: no check, no end of step)."""
    torch.manual_seed(0)
    model = ExtreMA(ModelSpec(arch=args.arch, mlp_dim=512, drop_path_rate=0.0)).to(world.device).train()
    opt = build_adamw(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
    size = model.online.encoder.img_size
    n = (size // model.online.encoder.patch_size) ** 2
    x = torch.randn(args.batch, 3, size, size, device=world.device)
    masks = random_masks(args.batch, n, 8, 0.9, device=world.device)
    with tempfile.TemporaryDirectory() as tmp:
        end = None
        if mode is not None:
            cadence = Cadence(log_every=args.log_every, ckpt_every=None, epochs=False)
            end = StepEnd(world=world, stage_dir=tmp, module=model, optimizer=opt, loop=LoopState(),
                          steps_per_epoch=10**6, total_steps=10**6, cadence=cadence, on_nonfinite=mode,
                          max_skipped_steps=10)  # fmt: skip
            end.resume()
        running = torch.zeros((), device=world.device)
        with Preemption() as preemption:
            t0 = 0.0
            for step in range(1, args.steps + 1):
                if step == 3:  # two warm-up steps
                    t0 = time.perf_counter()
                model.update_target(0.99)
                loss = model(x, x, masks)
                loss.backward()
                if end is None or end.update_allowed(step, loss.detach(), model.parameters()):
                    opt.step()
                    running += loss.detach()
                opt.zero_grad(set_to_none=True)
                if end is not None:
                    end(step, running, preemption)
            if world.device.type == "cuda":
                torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (args.steps - 2)


def main() -> None:
    """Measure the three variants interleaved and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="vit_nano")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    world = World(0, 1, 0, device)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "?")
    print(f"{name}; {device}; torch {torch.__version__}; {torch.get_num_threads()} threads; {args}")
    times: dict[str | None, list[float]] = {None: [], "fail": [], "skip": []}
    for _ in range(args.repeats):
        for mode in times:
            times[mode].append(run(mode, args, world))
    base = statistics.median(times[None])
    for mode, ts in times.items():
        t = statistics.median(ts)
        print(f"{mode or 'no check':>9}: {t * 1e3:8.2f} ms/step  ratio {t / base:.3f}")


if __name__ == "__main__":
    main()
