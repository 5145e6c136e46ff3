"""kNN after pretraining with each sample order over shards, against seed noise (issue 31).

    python bench/order_knn.py [--steps 36] [--seeds 3] [--knn-images 2000] [--parallel 2] [--workdir DIR]

Writes Fashion-MNIST (the Debian package's IDX files) as an ImageFolder of PNGs (train: 60,000, val: the 10,000
test images), shards it with `extrema-launch data shard` (about --shards shards for the train split), and sweeps
jobs/demo.yaml on those shards (`data.dataset: shards`, fp32, --steps steps with the demo's warm-up fraction) over
`data.order: [global, blocks]` x `pretrain.seed` (--seeds seeds) with `extrema-launch sweep` on the local backend.
Each run's kNN is the knn stage: the demo's protocol (knn_monitor: EMA encoder, k 20, train-split bank, val-split
queries) run once at the end instead of also at the start, on --knn-images bank and query images (demo: 10,000
each). Prints per order the top-1 of each seed, their mean and sample standard deviation, the difference of means
(blocks - global) in points and in pooled seed standard deviations, and each run's wall seconds (both stages).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extrema.data import datasets
from extrema.spec import DataSpec

REPO = Path(__file__).resolve().parents[1]
ORDERS = ("global", "blocks")
TAR_BLOCK = 512  # a shard sample is a header and the padded PNG, then a header and the padded label


def export_folder(folder: Path) -> int:
    """Fashion-MNIST's train and test splits as folder/{train,val}/<label>/<i>.png; returns the bytes a train
    split's shards will take (tar headers and padding included)."""
    spec = DataSpec(dataset="fashion_mnist")
    train_bytes = 0
    for split in ("train", "val"):
        data = datasets.fashion_mnist(spec, split)
        for label in range(len(data.classes)):
            (folder / split / str(label)).mkdir(parents=True)
        for i in range(len(data)):
            path = folder / split / str(int(data.targets[i])) / f"{i:05d}.png"
            Image.fromarray(data.images[i]).save(path, optimize=False)
            if split == "train":
                padded = math.ceil(path.stat().st_size / TAR_BLOCK) * TAR_BLOCK
                train_bytes += 3 * TAR_BLOCK + padded
    return train_bytes


def sweep_file(path: Path, shards: Path, args: argparse.Namespace) -> None:
    """jobs/demo.yaml on the shards in fp32 with `args.steps` steps (the demo's warm-up fraction), over the two
    orders and `args.seeds` seeds; the kNN by the knn stage (the same knn_monitor protocol, run once, not also at
    the start as the pretrain stage's monitor does)."""
    sweep = yaml.safe_load((REPO / "jobs" / "demo.yaml").read_text())
    sweep["name"] = "order_knn"
    base = sweep["base"]
    demo_steps = base["pretrain"]["steps"]
    base["data"] = {"dataset": "shards", "root": str(shards), "num_workers": base["data"]["num_workers"]}
    base["stages"] = ["pretrain", "knn"]
    base["pretrain"].update(
        steps=args.steps,
        warmup_epochs=base["pretrain"]["warmup_epochs"] * args.steps / demo_steps,
        precision="fp32",
        ckpt_every=args.steps,
        knn_monitor=False,
    )
    base["knn"].update(bank_size=args.knn_images, val_size=args.knn_images)
    sweep["logging"] = {"tensorboard": False}
    sweep["sweep"] = {"grid": {"data.order": list(ORDERS), "pretrain.seed": list(range(args.seeds))}}
    sweep["launcher"] = {"backend": "local", "max_parallel": args.parallel}
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))


def seconds(status: Path) -> float:
    """Wall seconds of one stage from its status record."""
    record = json.loads(status.read_text())
    return float(record["finished_at"]) - float(record["started_at"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=36, help="pretraining steps per run (demo: 1200)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shards", type=int, default=12, help="about this many train shards")
    parser.add_argument("--knn-images", type=int, default=2000, help="kNN bank and queries (demo: 10,000 each)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (launcher.max_parallel)")
    parser.add_argument("--workdir", help="keep the folder, shards and runs here (reused) instead of a temp dir")
    args = parser.parse_args()

    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"CPU: {model}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start", flush=True)

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(args.workdir or d)
        t = time.perf_counter()
        if not (tmp / "shards" / "val" / "index.json").exists():
            train_bytes = export_folder(tmp / "folder")
            cli = ["extrema-launch", "data", "shard", str(tmp / "folder"), str(tmp / "shards")]
            size = str(math.ceil(train_bytes / args.shards))
            subprocess.run([*cli, "--shard-size", size], check=True, stdout=subprocess.DEVNULL)
        index = json.loads((tmp / "shards" / "train" / "index.json").read_text())
        print(f"export and shard: {time.perf_counter() - t:.0f} s; {len(index['shards'])} train shards", flush=True)

        sweep_file(tmp / "order_knn.yaml", tmp / "shards", args)
        root = tmp / "runs"
        t = time.perf_counter()
        subprocess.run(["extrema-launch", "sweep", str(tmp / "order_knn.yaml"), "--root", str(root), "--quiet"],
                       check=True)  # fmt: skip
        print(f"sweep: {time.perf_counter() - t:.0f} s", flush=True)

        acc: dict[str, dict[int, float]] = {order: {} for order in ORDERS}
        wall: dict[str, dict[int, float]] = {order: {} for order in ORDERS}
        for run in sorted(p for p in (root / "order_knn").iterdir() if (p / "knn" / "result.json").exists()):
            spec = json.loads((run / "pretrain" / "spec.json").read_text())["overrides"]
            order, seed = spec["data.order"], spec["pretrain.seed"]
            acc[order][seed] = json.loads((run / "knn" / "result.json").read_text())["knn_top1"]
            wall[order][seed] = seconds(run / "pretrain" / "status.json") + seconds(run / "knn" / "status.json")

    seeds = sorted(acc["global"])
    print(f"\nkNN top-1 (%) after {args.steps} steps, bank {args.knn_images} / queries {args.knn_images}")
    print("| order | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | sample std | wall s per run |")
    print("|---|" + "---|" * (len(seeds) + 3))
    for order in ORDERS:
        values = [acc[order][s] for s in seeds]
        walls = ", ".join(f"{wall[order][s]:.0f}" for s in seeds)
        print(f"| {order} | " + " | ".join(f"{v:.2f}" for v in values)
              + f" | {statistics.mean(values):.2f} | {statistics.stdev(values):.2f} | {walls} |")  # fmt: skip
    diff = statistics.mean(acc["blocks"].values()) - statistics.mean(acc["global"].values())
    pooled = math.sqrt((statistics.variance(acc["blocks"].values()) + statistics.variance(acc["global"].values())) / 2)
    print(f"\nblocks - global: {diff:+.2f} points; pooled seed std {pooled:.2f}: {diff / pooled:+.2f} std")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
