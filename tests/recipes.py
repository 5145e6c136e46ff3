"""The sweep files in jobs/ scaled down in size only: the same stages, designs, strategy, monitor, masking,
augmentation, decoding, precision and schedules' shape, on a pico ViT, a few images and a few steps.

`scaled_down(recipe, data)` reads a recipe as the launcher does (includes merged), keeps the first run of its sweep,
and rewrites only what sets the size of the work: the architecture and head widths, the dataset's location and size
(an ImageFolder of small JPEGs for ImageNet-style roots, a canvas COCO set for COCO roots), step and image counts,
batch sizes, loader workers (at most one per rank) and cadences. Everything a recipe turns off stays off; nothing
it turns on is turned off. Periodic checkpoints are written in the background (`async_save`), as a cluster run would.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from extrema.data.datasets import fashion_mnist
from extrema.data.detection import build_canvas_set
from extrema.spec import DataSpec
from launch.inputs.yamlfile import load_with_includes
from tests.test_detect import DETECT as TEST_DETECT
from tests.test_detect import TINY_HEADS

JOBS = Path(__file__).resolve().parent.parent / "jobs"
RECIPES = sorted([*JOBS.glob("*.yaml"), *JOBS.glob("recipes/*.yaml")])
STEPS = 6  # pretraining steps: checkpoints at 2, 4 and 6; a kNN evaluation every 2 steps where the recipe monitors

MODEL = {"arch": "vit_pico", "mlp_dim": 64, "proj_dim": 32}
PRETRAIN = {"steps": STEPS, "batch_size": 16, "log_every": 1, "ckpt_every": 2, "keep_last": 10, "async_save": True}
KNN = {"bank_size": 64, "val_size": 32, "batch_size": 32, "k": 5}
DOWNSTREAM = {"epochs": 1, "batch_size": 16, "train_size": 64, "val_size": 32, "eval_batch_size": 16}
SIZES = ("batch_size", "warmup_steps", "train_scales", "max_size", "crop_scales", "crop_size", "test_size")
DETECT = {
    **{k: v for k, v in TEST_DETECT.items() if k in SIZES},
    **TINY_HEADS,
    "epochs": 1,
    "eval_batch_size": 4,
    "activation_checkpointing": False,
}
CANVAS = {"canvas_size": 64, "canvas_train_images": 16, "canvas_val_images": 8, "canvas_objects": [1, 3]}
TRAIN_IMAGES = {"fashion_mnist": 60000}  # training images per dataset kind (the scaled ImageFolder has 64)
LOCALITY = {"canvas_size": 48, "canvas_images": 8, "img_size": 48}


def image_folder(
    root: Path, classes: int = 4, train: int = 16, val: int = 8, size: int = 72, write: bool = True
) -> Path:
    """An ImageNet-layout folder of small random JPEGs (`train/<class>/`, `val/<class>/`), written once."""
    if (root / "val").exists() or not write:
        return root
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) // (c + 1)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG", quality=90)
    return root


def first_run(sweep: dict[str, Any]) -> dict[str, Any]:
    """The sweep section cut to its first run: the first value of every axis, the first explicit run."""
    out: dict[str, Any] = {}
    for kind in ("grid", "zip"):
        if sweep.get(kind):
            out[kind] = {path: values[:1] for path, values in sweep[kind].items()}
    if sweep.get("runs"):
        out["runs"] = sweep["runs"][:1]
    return out


def scale_section(section: dict[str, Any], sizes: dict[str, Any], drop: tuple[str, ...] = ()) -> dict[str, Any]:
    """A spec section with its size settings replaced (and `drop` removed); every other setting kept."""
    out = {k: v for k, v in section.items() if k not in drop}
    out.update(sizes)
    if "warmup_epochs" in out:
        out["warmup_epochs"] = min(float(out["warmup_epochs"]), 0.25)
    return out


def scaled_data(data: dict[str, Any], images: Path, write: bool) -> dict[str, Any]:
    """The data section on a local ImageFolder (for ImageNet-style roots) or as it is (Fashion-MNIST, synthetic)."""
    out = {k: v for k, v in data.items() if k not in ("storage", "cache_dir")}
    if out.get("dataset", "imagefolder") in ("imagefolder", "shards"):
        out.update(dataset="imagefolder", root=str(image_folder(images, write=write)))
    if out.get("dataset") == "synthetic":
        out["synthetic_size"] = 64
    out["num_workers"] = min(int(out.get("num_workers", 4)), 1)
    return out


def coco_set(root: Path, write: bool) -> dict[str, str]:
    """A small COCO-format detection set on local files (Fashion-MNIST garments on canvases): the URLs a `coco`
    detect stage reads."""
    if not write:
        return {
            f"{split}_{kind}": str(root / split / kind)
            for split in ("train", "val")
            for kind in ("annotations", "images")
        }
    fm = fashion_mnist(DataSpec(dataset="fashion_mnist"), "val")
    garments, labels = torch.from_numpy(fm.images[:64]), fm.targets[:64]
    urls = {}
    for split, n, seed in (("train", 16, 0), ("val", 8, 1)):
        url = build_canvas_set(garments, labels, fm.classes, str(root / split), n, 64, (1, 3), (0.6, 1.0), seed=seed)
        urls[f"{split}_annotations"] = url
        urls[f"{split}_images"] = str(root / split / "images")
    return urls


def scaled_down(recipe: Path, data: Path, write: bool = True) -> dict[str, Any]:
    """The recipe's sweep document with its first run and every size scaled down (launcher and root left to set);
    the small data sets it names are written under `data` unless `write` is false."""
    doc, _ = load_with_includes(recipe)
    doc = copy.deepcopy(doc)
    base = doc["base"]
    base["model"] = scale_section(base.get("model", {}), MODEL, drop=("img_size", "patch_size"))
    base["data"] = scaled_data(base.get("data", {}), data / "images", write)
    base["pretrain"] = scale_section(base.get("pretrain", {}), PRETRAIN, drop=("epochs",))
    if base["pretrain"].get("knn_every_epochs"):  # every second step, as the recipe evaluates between checkpoints
        images = TRAIN_IMAGES.get(base["data"]["dataset"], 64)
        base["pretrain"]["knn_every_epochs"] = 2 * PRETRAIN["batch_size"] / images
    base["knn"] = scale_section(base.get("knn", {}), KNN)
    for stage in ("probe", "finetune"):
        if stage in base:
            base[stage] = scale_section(base[stage], DOWNSTREAM)
    if "detect" in base:
        detect = scale_section(base["detect"], DETECT, drop=("lr_steps", "eval_every_epochs", "ckpt_every"))
        if detect.get("dataset") == "coco":
            detect.update(coco_set(data / "coco", write))
            if detect.pop("checkpoint", None) and "pretrain" not in base["stages"]:
                base["stages"] = ["pretrain", *base["stages"]]  # the checkpoint the recipe names: a pretraining
        else:
            detect.update(CANVAS)
        base["detect"] = detect
    if "locality" in base:
        base["locality"] = scale_section(base["locality"], LOCALITY)
    if doc.get("sweep"):
        doc["sweep"] = first_run(doc["sweep"])
    doc.pop("logging", None)
    return json.loads(json.dumps(doc))
