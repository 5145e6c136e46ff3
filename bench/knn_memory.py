"""Peak host memory of the kNN monitor and the raw-pixel baseline, per rank, at a reduced size, and the arithmetic
for the ViT-B recipe (100,000-image bank, 50,000 validation images at 224 px, 8 ranks).

    python bench/knn_memory.py [--bank 2000] [--val 500] [--img 224]

One process (one rank): a pico ViT at the given resolution on the synthetic set (resized like any evaluation
split), `knn_monitor` then `pixel_knn` as pretraining's step 0 runs them. Prints the peak RSS growth of each and the
bytes per evaluated image, and scales that to a rank of the recipe: each rank holds its slice of the images
(bank/world + val/world) and the gathered bank's features (bank x 768 x 4 bytes, on the device on a GPU).
"""

from __future__ import annotations

import argparse
import resource
import subprocess

import torch

from extrema.eval.knn_monitor import knn_monitor, pixel_knn
from extrema.models.vit import build_vit
from extrema.spec import Experiment
from extrema.train.dist import World


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    """Measure, then print the scaled arithmetic."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bank", type=int, default=2000)
    ap.add_argument("--val", type=int, default=500)
    ap.add_argument("--img", type=int, default=224)
    args = ap.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "cpu ?"))
    exp = Experiment.model_validate(
        {
            "model": {"arch": "vit_pico", "img_size": args.img, "patch_size": 16, "mlp_dim": 64, "proj_dim": 32},
            "data": {"dataset": "synthetic", "synthetic_size": max(args.bank, args.val), "num_workers": 0},
            "knn": {"bank_size": args.bank, "val_size": args.val, "batch_size": 64},
        }
    )
    world = World(0, 1, 0, torch.device("cpu"))
    encoder = build_vit(exp.model, drop_path_rate=0.0).eval()
    torch.set_num_threads(2)
    before = peak_rss_mb()
    acc = knn_monitor(encoder, exp, world)
    monitor = peak_rss_mb()
    pixels = pixel_knn(exp, world)
    after = peak_rss_mb()
    images = args.bank + args.val
    per_image = (monitor - before) * 2**20 / images
    print(f"knn monitor: +{monitor - before:.0f} MB peak RSS for {images} images ({per_image / 1024:.0f} KiB/image)")
    print(f"pixel baseline after it: +{after - monitor:.0f} MB more (shares the cached images)")
    print(f"(accuracies, meaningless for a random encoder: {acc['top1']:.1f} / pixels {pixels['top1']:.1f})")
    ranks, bank, val, dim = 8, 100_000, 50_000, 768
    cached = (bank + val) / ranks * 3 * args.img * args.img
    feats = bank * dim * 4
    print(
        f"ViT-B recipe, per rank of {ranks}: cached uint8 images {cached / 2**30:.2f} GiB, gathered bank features "
        f"{feats / 2**30:.2f} GiB (device), pixel bank {bank * 3 * 32 * 32 * 4 / 2**30:.2f} GiB (device); before: "
        f"the pixel baseline alone held every image of both splits as float on every rank, "
        f"{(bank + val) * 3 * args.img * args.img * 5 / 2**30:.0f} GiB per rank (uint8 cache + float copy)"
    )


if __name__ == "__main__":
    main()
