"""COCO evaluation with pycocotools: detections -> COCO results -> COCOeval `bbox` and `segm` -> AP numbers.

Numbers are percentages, as papers print them (Table 1: AP, AP50, AP75 for boxes and masks), plus the
per-size APs / APm / APl; a size without any ground-truth object gets NaN (COCOeval's -1).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor

from extrema.data.detection import encode_mask

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the first six entries of COCOeval.stats
IOU_TYPES = {"box": "bbox", "mask": "segm"}
MASK_THRESHOLD = 0.5
SIZE_RANGES = ((0, 32**2), (32**2, 96**2), (96**2, 1e10))  # COCOeval's small / medium / large areas


def to_results(
    output: Mapping[str, Tensor], image_id: int, category_ids: Sequence[int]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One image's Mask R-CNN output (boxes xyxy, labels 1..K, scores, masks (N, 1, H, W) in [0, 1]) -> COCO results.

    Returns (box results, mask results); label k maps to `category_ids[k - 1]`.
    """
    boxes = output["boxes"].detach().float().cpu().numpy()
    labels = output["labels"].detach().cpu().tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    masks = output["masks"][:, 0] > MASK_THRESHOLD if "masks" in output else None
    box_results, mask_results = [], []
    for n, (label, score) in enumerate(zip(labels, scores)):
        x0, y0, x1, y1 = (float(v) for v in boxes[n])
        common = {"image_id": int(image_id), "category_id": int(category_ids[label - 1]), "score": float(score)}
        box_results.append({**common, "bbox": [x0, y0, x1 - x0, y1 - y0]})
        if masks is not None:
            mask_results.append({**common, "segmentation": encode_mask(masks[n].cpu().numpy())})
    return box_results, mask_results


def has_objects(gt: COCO, image_ids: Iterable[int], area_range: tuple[float, float]) -> bool:
    """Whether the images hold a non-crowd ground-truth object whose area lies in the range."""
    lo, hi = area_range
    anns = gt.loadAnns(gt.getAnnIds(imgIds=list(image_ids), iscrowd=False))
    return any(lo <= a["area"] <= hi for a in anns)


def summarize(gt: COCO, results: list[dict[str, Any]], iou_type: str, image_ids: Iterable[int]) -> list[float]:
    """COCOeval of one IoU type over the given images -> its six AP numbers in percent (NaN where undefined)."""
    if not results:  # nothing detected: 0, or NaN for a size range without ground truth (as COCOeval says)
        return [0.0, 0.0, 0.0] + [0.0 if has_objects(gt, image_ids, r) else math.nan for r in SIZE_RANGES]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(copy.deepcopy(results))  # loadRes adds keys to the dicts it is given
        ev = COCOeval(gt, dt, iou_type)
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [math.nan if s < 0 else 100.0 * float(s) for s in ev.stats[: len(METRICS)]]


def evaluate(
    gt: COCO,
    box_results: list[dict[str, Any]],
    mask_results: list[dict[str, Any]],
    image_ids: Iterable[int],
) -> dict[str, float]:
    """Box and mask AP, AP50, AP75, APs, APm, APl (percent) of the results on the given ground-truth images."""
    ids = list(image_ids)
    out: dict[str, float] = {}
    for name, results in (("box", box_results), ("mask", mask_results)):
        for metric, value in zip(METRICS, summarize(gt, results, IOU_TYPES[name], ids)):
            out[f"{name}_{metric}"] = value
    return out
