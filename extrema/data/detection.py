"""Detection data: COCO-format sets on any fsspec URL, v2 transforms that move boxes and masks with the image,
and a seeded builder of a small COCO-format set of real Fashion-MNIST garments pasted onto larger canvases.

A sample is (tv_tensors.Image uint8 (3, H, W), target) with target = {"boxes": BoundingBoxes XYXY (N, 4),
"masks": Mask uint8 (N, H, W), "labels": int64 (N,) in 1..K (0 is the background), "image_id": int}.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
import torch.nn.functional as F
from fsspec.core import url_to_fs
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image, encode_png
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from extrema.data.datasets import FASHION_MNIST_CLASSES, locate_fashion_mnist, read_idx, seed_of
from extrema.run import rundir
from extrema.spec import DataSpec, DetectSpec
from extrema.spec_groups import Canvas

Target = dict[str, Any]
Sample = tuple[tv_tensors.Image, Target]
ANNOTATIONS = "annotations.json"
IMAGES = "images"
CANVAS_MASK_LEVEL = 24  # a resized garment pixel brighter than this belongs to its mask
GARMENT_SIDE = 28
# pycocotools' mask decoding warns on every call under numpy 2 (its RLE objects lack the `copy` keyword); it decodes
# correctly all the same.
warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword")


# ------------------------------------------------------------------------------------------------- COCO files


def coco_index(dataset: Mapping[str, Any]) -> COCO:
    """A pycocotools COCO object over an already parsed annotations document (no file, no printing)."""
    coco = COCO()
    coco.dataset = dict(dataset)
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """(H, W) binary mask -> compressed RLE with a JSON-ready `counts` string."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return dict(rle)


def read_coco(url: str) -> COCO:
    """A COCO annotations JSON on any fsspec URL, indexed by pycocotools."""
    fs, path = url_to_fs(url)
    with fs.open(path, "r") as f:
        return coco_index(json.load(f))


class CocoDetection(Dataset[Sample]):
    """COCO-format detection set: an annotations JSON and an image directory, both fsspec URLs.

    Crowd regions and boxes under 1 px are left out of the targets; `drop_empty` also leaves out the images
    with no object left (as the 1x recipe does for training). Labels are the sorted category ids renumbered 1..K.
    """

    def __init__(self, annotations: str, images: str, drop_empty: bool = False) -> None:
        self.coco = read_coco(annotations)
        self.fs, self.root = url_to_fs(images)
        self.category_ids = sorted(self.coco.getCatIds())
        self.classes = [str(self.coco.cats[c]["name"]) for c in self.category_ids]
        self.label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        ids = sorted(self.coco.getImgIds())
        self.ids = [i for i in ids if self.objects(i)] if drop_empty else ids

    def __len__(self) -> int:
        return len(self.ids)

    def objects(self, image_id: int) -> list[dict[str, Any]]:
        """The annotations of an image that become targets: not crowd, box at least 1 px wide and high."""
        anns = self.coco.imgToAnns.get(image_id, [])
        return [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]

    def image(self, i: int) -> tv_tensors.Image:
        """The i-th image as uint8 RGB (3, H, W)."""
        info = self.coco.imgs[self.ids[i]]
        raw = self.fs.cat_file(f"{self.root.rstrip('/')}/{info['file_name']}")
        return tv_tensors.Image(decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), ImageReadMode.RGB))

    def __getitem__(self, i: int) -> Sample:
        image_id = self.ids[i]
        img = self.image(i)
        h, w = img.shape[-2:]
        anns = self.objects(image_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = np.stack([self.coco.annToMask(a) for a in anns]) if anns else np.zeros((0, h, w), np.uint8)
        target: Target = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w)),
            "masks": tv_tensors.Mask(torch.from_numpy(masks)),
            "labels": torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "image_id": image_id,
        }
        return img, target


# -------------------------------------------------------------------------------------------------- Transforms


class RandomSizeCrop(v2.Transform):
    """Crop a random region whose height and width are drawn from [min_size, max_size], capped by the image (DETR)."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the crop's size, then its position."""
        h, w = v2.query_size(flat_inputs)
        ch = int(torch.randint(min(self.min_size, h), min(h, self.max_size) + 1, ()))
        cw = int(torch.randint(min(self.min_size, w), min(w, self.max_size) + 1, ()))
        top = int(torch.randint(0, h - ch + 1, ()))
        left = int(torch.randint(0, w - cw + 1, ()))
        return {"top": top, "left": left, "height": ch, "width": cw}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Crop images, boxes and masks alike."""
        return self._call_kernel(TF.crop, inpt, **params)


def train_transform(
    scales: Sequence[int], max_size: int, crop_scales: Sequence[int] | None, crop_size: tuple[int, int]
) -> v2.Transform:
    """Flip, then multi-scale resize or DETR's resize-crop-resize branch; empty boxes dropped; float image.

    The shorter side is drawn from `scales` (longer side capped at `max_size`); boxes emptied by the crop go
    with their masks and labels.
    """
    resize = v2.RandomShortestSize(list(scales), max_size=max_size, antialias=True)
    geometry: v2.Transform = resize
    if crop_scales:
        crop = v2.Compose(
            [v2.RandomShortestSize(list(crop_scales), antialias=True), RandomSizeCrop(*crop_size), resize]
        )
        geometry = v2.RandomChoice([resize, crop])
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(),
            geometry,
            v2.ClampBoundingBoxes(),
            v2.SanitizeBoundingBoxes(min_size=1),
            v2.ToDtype(torch.float32, scale=True),
        ]
    )


class SeededDetection(Dataset[tuple[Tensor, Target]]):
    """Transformed sample (epoch, i) of a subset of a detection set; its randomness derives from (seed, epoch, i)."""

    def __init__(self, base: CocoDetection, indices: list[int], transform: Callable[..., Any], seed: int) -> None:
        self.base, self.indices, self.transform, self.seed = base, indices, transform, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Target]:
        epoch, i = key
        img, target = self.base[self.indices[i]]
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed_of(self.seed, epoch, i))
            img, target = self.transform(img, target)
        return img, target


class EvalImages(Dataset[tuple[Tensor, int]]):
    """(float image in [0, 1], image id) of a subset of a detection set, untransformed (the model resizes)."""

    def __init__(self, base: CocoDetection, indices: list[int]) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        j = self.indices[i]
        return TF.to_dtype(self.base.image(j), torch.float32, scale=True), self.base.ids[j]


def collate(batch: list[Any]) -> tuple[list[Any], ...]:
    """Detection batches stay lists: images differ in size."""
    return tuple(list(items) for items in zip(*batch))


def model_target(target: Target, device: torch.device) -> dict[str, Tensor]:
    """The keys torchvision's Mask R-CNN reads, as plain tensors on the device."""
    return {k: target[k].as_subclass(Tensor).to(device, non_blocking=True) for k in ("boxes", "labels", "masks")}


# ------------------------------------------------------------------------------------- Fashion-MNIST canvases


def place(sizes: list[int], canvas: int, gen: torch.Generator, tries: int = 50) -> list[tuple[int, int, int]]:
    """Seeded non-overlapping squares (top, left, side) of the given sides on a canvas; misfits are left out.

    A square that finds no free place in `tries` draws is dropped.
    """
    placed: list[tuple[int, int, int]] = []
    for side in sizes:
        for _ in range(tries):
            top, left = (int(v) for v in torch.randint(0, canvas - side + 1, (2,), generator=gen))
            if all(top + side <= t or t + s <= top or left + side <= le or le + s <= left for t, le, s in placed):
                placed.append((top, left, side))
                break
    return placed


def canvas_image(
    garments: Tensor, labels: list[int], size: int, scale: tuple[float, float], gen: torch.Generator
) -> tuple[Tensor, list[tuple[int, Tensor]]]:
    """Paste garments resized to 28 * U(scale) px onto a black canvas, without overlap.

    Garments are grayscale (n, 28, 28); black is Fashion-MNIST's own background. Returns the uint8 canvas
    (1, size, size) and (label, mask (size, size) bool) of each garment placed.
    """
    lo, hi = scale
    sides = [
        min(size, max(4, round(GARMENT_SIDE * (lo + (hi - lo) * float(torch.rand((), generator=gen)))))) for _ in labels
    ]
    img = torch.zeros(size, size, dtype=torch.uint8)
    objects: list[tuple[int, Tensor]] = []
    for (top, left, side), garment, label in zip(place(sides, size, gen), garments, labels):
        resized = F.interpolate(garment[None, None].float(), size=(side, side), mode="bilinear", antialias=True)
        pixels = resized[0, 0].round().clamp(0, 255).to(torch.uint8)
        inside = pixels > CANVAS_MASK_LEVEL
        if not inside.any():
            continue
        window = img[top : top + side, left : left + side]
        window[inside] = pixels[inside]
        mask = torch.zeros(size, size, dtype=torch.bool)
        mask[top : top + side, left : left + side] = inside
        objects.append((label, mask))
    return img[None], objects


def build_canvas_set(
    images: Tensor,
    labels: Tensor,
    classes: Sequence[str],
    out: str,
    count: int,
    size: int,
    objects: tuple[int, int],
    scale: tuple[float, float],
    seed: int,
) -> str:
    """Write a COCO-format set of `count` canvases made from grayscale garments (N, 28, 28) to `out`.

    Layout: `<out>/images/<id>.png` and `<out>/annotations.json` (written last, so its presence marks a complete
    set). Canvas i depends on (seed, i) only. Boxes are the tight boxes of the garment pixels; masks are RLE.
    Returns the annotations URL.
    """
    fs, root = url_to_fs(out)
    fs.makedirs(f"{root.rstrip('/')}/{IMAGES}", exist_ok=True)
    image_entries: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(count):
        gen = torch.Generator().manual_seed(seed_of(seed, i))
        n = int(torch.randint(objects[0], objects[1] + 1, (), generator=gen))
        picks = torch.randint(0, len(images), (n,), generator=gen)
        canvas, placed = canvas_image(images[picks], [int(labels[p]) for p in picks], size, scale, gen)
        image_id = i + 1
        name = f"{image_id:06d}.png"
        fs.pipe_file(f"{root.rstrip('/')}/{IMAGES}/{name}", encode_png(canvas).numpy().tobytes())
        image_entries.append({"id": image_id, "file_name": name, "height": size, "width": size})
        for label, mask in placed:
            ys, xs = torch.nonzero(mask, as_tuple=True)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": int(mask.sum()),
                    "segmentation": encode_mask(mask.numpy()),
                    "iscrowd": 0,
                }
            )
    document = {
        "info": canvas_info(count, size, objects, scale, seed),
        "licenses": [],
        "images": image_entries,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "garment"} for k, name in enumerate(classes)],
    }
    url = rundir.join(out, ANNOTATIONS)
    rundir.write_json(url, document)
    return url


def canvas_info(
    count: int, size: int, objects: tuple[int, int], scale: tuple[float, float], seed: int
) -> dict[str, Any]:
    """The `info` record of a canvas set: every parameter it was built from."""
    return {
        "description": "Fashion-MNIST garments on canvases",
        "count": count,
        "size": size,
        "objects": list(objects),
        "scale": list(scale),
        "seed": seed,
    }


def canvas_set_ready(out: str, info: dict[str, Any]) -> bool:
    """Whether `out` holds a complete canvas set built from exactly these parameters."""
    doc = rundir.read_json(rundir.join(out, ANNOTATIONS))
    return doc is not None and doc.get("info") == info


CANVAS_SOURCES = {"train": "train", "val": "t10k"}  # canvas split -> Fashion-MNIST split its garments come from


def canvas_set(data: DataSpec, c: Canvas, where: str, count: int, source: str, seed: int) -> tuple[str, str]:
    """Build (once) under `where` a set of `count` canvases as `c` sets them, of garments from Fashion-MNIST split
    `source`; (annotations URL, images URL). A complete set built from the same parameters is kept as it is."""
    info = canvas_info(count, c.canvas_size, c.canvas_objects, c.canvas_scale, seed)
    if not canvas_set_ready(where, info):
        images_url, labels_url = locate_fashion_mnist(data, source)
        build_canvas_set(
            torch.from_numpy(read_idx(images_url)),
            torch.from_numpy(read_idx(labels_url).astype(np.int64)),
            FASHION_MNIST_CLASSES,
            where,
            count,
            c.canvas_size,
            c.canvas_objects,
            c.canvas_scale,
            seed,
        )
    return rundir.join(where, ANNOTATIONS), rundir.join(where, IMAGES)


def canvas_sets(data: DataSpec, d: DetectSpec, directory: str, seed: int = 0) -> dict[str, tuple[str, str]]:
    """Build (once) the train and val canvas sets under `directory`; split -> (annotations URL, images URL).

    Training canvases use Fashion-MNIST training garments, validation canvases the t10k garments. The sets
    depend on the canvas settings and `seed` only, so every run with the same settings sees the same images.
    """
    counts = {"train": d.canvas_train_images, "val": d.canvas_val_images}
    return {
        split: canvas_set(data, d, rundir.join(directory, split), counts[split], source, seed_of(seed, k))
        for k, (split, source) in enumerate(CANVAS_SOURCES.items())
    }
