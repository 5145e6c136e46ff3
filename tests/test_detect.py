"""The detect stage: ViT pyramid shapes, strict weights, the canvas COCO builder, aligned transforms, COCOeval,
the 1x schedule, and a tiny Mask R-CNN run that trains, evaluates and resumes exactly."""

import contextlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fsspec.core import url_to_fs
from pycocotools.coco import COCO
from torch import nn
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.ops import box_iou

from extrema import entry
from extrema.data import detection
from extrema.data.datasets import FASHION_MNIST_DEBIAN_DIR, fashion_mnist
from extrema.data.detection import CocoDetection, build_canvas_set, train_transform
from extrema.eval import coco_eval
from extrema.models.detector import STRIDES, ViTPyramid, build_detector, feature_blocks
from extrema.models.vit import VisionTransformer, sincos_pos_embed_2d
from extrema.run import rundir
from extrema.spec import DataSpec, DetectSpec, Experiment, ModelSpec
from extrema.stages.detect import build_model, detection_sets, evaluate, step_lr
from extrema.train import weights
from extrema.train.dist import World
from tests.stage_runs import TINY_EXPERIMENT, checkpointed_model, make_run, merge
from tests.test_distributed import forked_ranks
from tests.weight_sources import save_pretrain_checkpoint

# pycocotools' mask decoding warns on every call under numpy 2; the masks are right all the same.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
needs_fashion_mnist = pytest.mark.skipif(
    not (Path(FASHION_MNIST_DEBIAN_DIR) / "train-images-idx3-ubyte.gz").exists(),
    reason="apt-get install dataset-fashion-mnist",
)
TINY_HEADS: dict[str, Any] = {
    "fpn_channels": 16,
    "box_head_dim": 32,
    "anchor_sizes": [8, 16, 32, 64, 128],
    "rpn_batch_size": 32,
    "rpn_proposals": 100,
    "roi_batch_size": 32,
}
DETECT: dict[str, Any] = {
    "dataset": "fashion_mnist_canvas",
    "canvas_size": 64,
    "canvas_train_images": 16,
    "canvas_val_images": 8,
    "canvas_objects": [1, 3],
    "canvas_scale": [0.6, 1.0],
    "epochs": 2,
    "batch_size": 4,
    "lr": 1e-3,
    "warmup_steps": 2,
    "train_scales": [56, 64, 72],
    "max_size": 96,
    "crop_scales": [48, 56],
    "crop_size": [40, 56],
    "test_size": 64,
    "eval_every_epochs": 1,
    **TINY_HEADS,
}
PICO = ModelSpec(arch="vit_pico")
PICO16 = ModelSpec(arch="vit_pico", patch_size=16)  # the CAE adapters: 2 deconvs, 1 deconv, identity, max-pool


def tiny_spec(**over: Any) -> DetectSpec:
    return DetectSpec.model_validate({**DETECT, **over})


# --------------------------------------------------------------------------------------------------- backbone


def test_feature_blocks_are_cae_indices_scaled_by_depth_and_read_relative_to_the_patch() -> None:
    assert feature_blocks(12, 16) == (3, 5, 7, 11)  # CAE's ViT-B/16
    assert feature_blocks(24, 16) == (7, 11, 15, 23)
    assert feature_blocks(4, 16) == (0, 1, 2, 3)
    assert feature_blocks(6, 16) == (1, 2, 3, 5)
    assert feature_blocks(2, 16) == (0, 0, 0, 1)
    # Patch 8: stride 4 is p/2 (block 5 of 12), 8 is p (block 7), 16 and 32 are 2p and coarser (block 11).
    assert feature_blocks(12, 8) == (5, 7, 11, 11)
    assert feature_blocks(12, 4) == (7, 11, 11, 11)
    assert feature_blocks(4, 4) == (2, 3, 3, 3)  # vit_nano: the stride-4 map is no longer the first block's
    assert feature_blocks(2, 4) == (0, 1, 1, 1)
    assert feature_blocks(12, 32) == (3, 3, 5, 7)  # strides finer than p/4 take CAE's finest block


@pytest.mark.parametrize("model", [PICO, PICO16], ids=["patch4", "patch16"])
@pytest.mark.parametrize("size", [(64, 64), (96, 160), (224, 128)])
def test_backbone_emits_strides_4_to_32_then_fpn_levels(model: ModelSpec, size: tuple[int, int]) -> None:
    detector = build_detector(model, tiny_spec(), num_classes=10).eval()
    h, w = size
    x = torch.randn(2, 3, h, w)
    maps = detector.backbone.body(x)
    assert [tuple(m.shape) for m in maps] == [(2, 64, h // s, w // s) for s in STRIDES]
    levels = detector.backbone(x)
    assert list(levels) == ["0", "1", "2", "3", "pool"]
    expected = [(2, 16, h // s, w // s) for s in STRIDES] + [(2, 16, math.ceil(h / 64), math.ceil(w / 64))]
    assert [tuple(v.shape) for v in levels.values()] == expected
    assert all(v.dtype == torch.float32 for v in levels.values())
    names = [n for n, _ in detector.named_parameters()]
    assert not any("cls_token" in n or "blocks_token" in n or "encoder.norm" in n for n in names)


def test_patch16_adapters_are_the_cae_ones_and_positions_follow_the_grid() -> None:
    pyramid = build_detector(PICO16, tiny_spec(), num_classes=3).backbone.body
    first, second, third, fourth = pyramid.adapters
    assert [type(m) for m in first] == [nn.ConvTranspose2d, nn.BatchNorm2d, nn.GELU, nn.ConvTranspose2d]
    assert [type(m) for m in second] == [nn.ConvTranspose2d]
    assert isinstance(third, nn.Identity) and isinstance(fourth, nn.MaxPool2d) and fourth.kernel_size == 2
    # The position table is the sin-cos table of each input's own grid: a 3x5 grid is not a crop of a 5x5 one.
    enc = pyramid.encoder
    x = torch.randn(1, 3, 48, 80)
    patches = enc.patch_embed(x).flatten(2).transpose(1, 2)
    table = enc.embed(x) - patches
    torch.testing.assert_close(table[0], sincos_pos_embed_2d(64, 3, 5))
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        pyramid(torch.randn(1, 3, 40, 48))
    with pytest.raises(ValueError, match="no class token"):
        ViTPyramid(VisionTransformer(embed_dim=64, depth=2, num_heads=2), (0, 0, 1, 1))


def test_bf16_backbone_feeds_fp32_heads() -> None:
    torch.manual_seed(0)
    fp32 = build_detector(PICO, tiny_spec(), num_classes=3).eval()
    bf16 = build_detector(PICO, tiny_spec(), num_classes=3, autocast_dtype=torch.bfloat16).eval()
    bf16.load_state_dict(fp32.state_dict())
    x = torch.randn(2, 3, 64, 64)
    exact, rounded = fp32.backbone(x), bf16.backbone(x)
    # Each bf16 op rounds to 8 bits (eps 2^-7): a few eps of norm-wise error after the blocks, on any CPU's kernels
    # (measured 0.5-0.9 eps); element-wise bounds instead hinge on how a CPU rounds values near zero.
    for k in exact:
        assert rounded[k].dtype == torch.float32
        error = (rounded[k] - exact[k]).norm() / exact[k].norm()
        assert error < 4 * torch.finfo(torch.bfloat16).eps, (k, error)
    assert any(not torch.equal(rounded[k], exact[k]) for k in exact)  # the backbone did run in bf16
    image, target = synthetic_sample()
    bf16.train()
    losses = bf16(
        [image.float() / 255], [{k: target[k].as_subclass(torch.Tensor) for k in ("boxes", "labels", "masks")}]
    )
    total = sum(losses.values())
    total.backward()  # type: ignore[union-attr]
    assert torch.isfinite(total) and bf16.roi_heads.box_predictor.cls_score.weight.grad is not None


def test_backbone_loads_the_pretrained_student_strictly(tmp_path: Path) -> None:
    exp = make_run(str(tmp_path), {"stages": ["pretrain", "detect"], "detect": DETECT})
    pretrained = save_pretrain_checkpoint(str(tmp_path / "pretrain" / "ckpt"), exp.model)
    url = weights.resolve(str(tmp_path / "pretrain" / "ckpt"))
    student = pretrained.online.encoder.state_dict()
    model = build_model(exp, exp.detect, 10, url, None)
    enc = model.backbone.body.encoder.state_dict()
    assert enc.keys() == {k for k in student if not k.startswith(("cls_token", "blocks_token", "norm."))}
    assert all(torch.equal(enc[k], student[k]) for k in enc)
    ema = build_model(exp, exp.detect.model_copy(update={"encoder": "ema"}), 10, url, None)
    target = pretrained.target.encoder.state_dict()["blocks.1.attn.qkv.weight"]
    assert torch.equal(ema.backbone.body.encoder.state_dict()["blocks.1.attn.qkv.weight"], target)
    wider = exp.model_copy(update={"model": ModelSpec(arch="vit_nano")})
    with pytest.raises(ValueError, match="shape mismatches"):
        build_model(wider, exp.detect, 10, url, None)
    random_a = build_model(exp, exp.detect, 10, None, None).backbone.body.encoder.blocks[0].mlp.fc1.weight
    random_b = build_model(exp, exp.detect, 10, None, None).backbone.body.encoder.blocks[0].mlp.fc1.weight
    assert torch.equal(random_a, random_b) and not torch.equal(random_a, student["blocks.0.mlp.fc1.weight"])


# ------------------------------------------------------------------------------------------------------- data


@needs_fashion_mnist
def test_canvas_builder_writes_coco_that_pycocotools_loads(tmp_path: Path) -> None:
    fm = fashion_mnist(DataSpec(dataset="fashion_mnist"), "val")
    garments, labels = torch.from_numpy(fm.images[:200]), fm.targets[:200]
    url = build_canvas_set(garments, labels, fm.classes, str(tmp_path / "a"), 12, 80, (1, 4), (0.8, 1.4), seed=3)
    coco = COCO(url)
    assert len(coco.getImgIds()) == 12 and sorted(coco.getCatIds()) == list(range(1, 11))
    counts = [len(coco.getAnnIds(imgIds=[i])) for i in coco.getImgIds()]
    assert all(1 <= c <= 4 for c in counts) and len(set(counts)) > 1
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann)
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()]
        assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
        info = coco.imgs[ann["image_id"]]
        img = decode_image(str(tmp_path / "a" / "images" / info["file_name"]), ImageReadMode.GRAY)[0]
        assert img.shape == (80, 80) and (img[torch.from_numpy(mask).bool()] > 24).all()  # mask = bright garment
    again = build_canvas_set(garments, labels, fm.classes, str(tmp_path / "b"), 12, 80, (1, 4), (0.8, 1.4), seed=3)
    assert json.loads(Path(again).read_text()) == json.loads(Path(url).read_text())
    assert (tmp_path / "a/images/000007.png").read_bytes() == (tmp_path / "b/images/000007.png").read_bytes()
    other = build_canvas_set(garments, labels, fm.classes, str(tmp_path / "c"), 12, 80, (1, 4), (0.8, 1.4), seed=4)
    assert json.loads(Path(other).read_text())["annotations"] != json.loads(Path(url).read_text())["annotations"]
    # The same files through an fsspec URL: targets in 1..10, boxes XYXY over masks of the image's size.
    fs_url = "memory://canvas"
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    fs, _ = url_to_fs(fs_url)
    fs.put(str(tmp_path / "copy"), "/canvas", recursive=True)
    ds = CocoDetection(f"{fs_url}/annotations.json", f"{fs_url}/images")
    img, target = ds[0]
    assert img.shape == (3, 80, 80) and target["masks"].shape[1:] == (80, 80)
    assert target["labels"].min() >= 1 and target["labels"].max() <= 10


def synthetic_sample() -> tuple[tv_tensors.Image, dict[str, Any]]:
    """Three objects whose pixels have the value 60 * label: boxes, masks and labels must stay consistent."""
    h, w = 90, 120
    masks = torch.zeros(3, h, w, dtype=torch.uint8)
    masks[0, 5:30, 8:40] = 1
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks[1] = ((yy - 60) ** 2 / 20**2 + (xx - 90) ** 2 / 25**2 <= 1).to(torch.uint8)
    masks[2, 50:85, 10:22] = 1
    labels = torch.tensor([1, 2, 3])
    img = torch.zeros(3, h, w, dtype=torch.uint8)
    for m, lab in zip(masks, labels):
        img[:, m.bool()] = 60 * int(lab)
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    target = {
        "boxes": tv_tensors.BoundingBoxes(torch.tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=(h, w)),
        "masks": tv_tensors.Mask(masks),
        "labels": labels,
        "image_id": 7,
    }
    return tv_tensors.Image(img), target


def test_transforms_keep_boxes_masks_and_labels_aligned_with_the_image() -> None:
    img, target = synthetic_sample()
    transform = train_transform((60, 80, 100), 150, (50, 70), (30, 60))
    sizes, flipped = set(), 0
    for seed in range(24):
        torch.manual_seed(seed)
        out, t = transform(img, target)
        assert out.dtype == torch.float32 and t["image_id"] == 7
        h, w = out.shape[-2:]
        sizes.add((h, w))
        assert t["masks"].shape == (len(t["labels"]), h, w) and t["boxes"].shape == (len(t["labels"]), 4)
        assert tuple(t["boxes"].canvas_size) == (h, w)
        for box, mask, label in zip(t["boxes"], t["masks"], t["labels"]):
            ys, xs = torch.nonzero(mask, as_tuple=True)
            tight = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
            assert box_iou(box[None], tight[None]).item() > 0.75  # nearest-neighbour masks vs exactly scaled boxes
            value = out[0][mask.bool()].median() * 255
            assert abs(value - 60 * int(label)) <= 15  # each mask covers its own object (labels are 60 apart)
        union = t["masks"].bool().any(dim=0) if len(t["masks"]) else torch.zeros(h, w, dtype=torch.bool)
        bright = out[0] > 30 / 255
        # torchvision resizes masks with (legacy) nearest and images with antialiased bilinear: up to half an input
        # pixel apart per resize, a few output pixels after the crop branch's upscaling.
        assert (union & bright).sum() >= 0.75 * (union | bright).sum()
        if len(t["labels"]) and 1 in t["labels"].tolist():
            box = t["boxes"][t["labels"].tolist().index(1)]
            flipped += int(box[0] > w / 2)  # object 1 sits top-left unless flipped
    assert len(sizes) > 3 and 0 < flipped < 24


# ------------------------------------------------------------------------------------------------- evaluation


def ground_truth_document() -> dict[str, Any]:
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for image_id in (1, 2, 3):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": 60, "width": 80})
        for k in range(image_id):
            mask = np.zeros((60, 80), np.uint8)
            mask[5 + 15 * k : 18 + 15 * k, 4 + 20 * k : 20 + 20 * k + 3 * image_id] = 1
            ys, xs = np.nonzero(mask)
            box = [int(xs.min()), int(ys.min()), int(xs.max() + 1 - xs.min()), int(ys.max() + 1 - ys.min())]
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": 10 + (k + image_id) % 2,
                    "bbox": box,
                    "area": int(mask.sum()),
                    "segmentation": detection.encode_mask(mask),
                    "iscrowd": 0,
                }
            )
    categories = [{"id": 10, "name": "a"}, {"id": 11, "name": "b"}]
    return {"info": {}, "licenses": [], "images": images, "annotations": anns, "categories": categories}


def test_cocoeval_scores_ground_truth_returned_as_detections_100() -> None:
    gt = detection.coco_index(ground_truth_document())
    boxes: list[dict[str, Any]] = []
    masks: list[dict[str, Any]] = []
    for image_id in gt.getImgIds():
        anns = gt.imgToAnns[image_id]
        xyxy = torch.tensor(
            [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns]
        )
        output = {
            "boxes": xyxy.float(),
            "labels": torch.tensor([a["category_id"] - 9 for a in anns]),  # label k -> category_ids[k - 1]
            "scores": torch.ones(len(anns)),
            "masks": torch.stack([torch.from_numpy(gt.annToMask(a)).float() for a in anns])[:, None],
        }
        b, m = coco_eval.to_results(output, image_id, [10, 11])
        boxes += b
        masks += m
    scores = coco_eval.evaluate(gt, boxes, masks, gt.getImgIds())
    for kind in ("box", "mask"):
        assert scores[f"{kind}_AP"] == pytest.approx(100.0)
        assert scores[f"{kind}_AP50"] == pytest.approx(100.0) and scores[f"{kind}_AP75"] == pytest.approx(100.0)
        assert scores[f"{kind}_APs"] == pytest.approx(100.0) and math.isnan(scores[f"{kind}_APl"])
    shifted = [{**r, "bbox": [r["bbox"][0] + 0.15 * r["bbox"][2], *r["bbox"][1:]]} for r in boxes]
    worse = coco_eval.evaluate(gt, shifted, masks, gt.getImgIds())
    assert 0 < worse["box_AP"] < 100 and worse["box_AP75"] < worse["box_AP50"] and worse["mask_AP"] == 100
    wrong_class = [{**r, "category_id": 21 - r["category_id"]} for r in boxes]
    assert coco_eval.evaluate(gt, wrong_class, [], gt.getImgIds())["box_AP"] == 0.0
    nothing = coco_eval.evaluate(gt, [], [], gt.getImgIds())
    assert nothing["mask_AP"] == 0.0 and nothing["box_APs"] == 0.0 and math.isnan(nothing["box_APl"])


# ------------------------------------------------------------------------------------------------ the stage


def test_step_schedule_is_the_1x_schedule_scaled_by_epochs() -> None:
    d = DetectSpec(dataset="fashion_mnist_canvas", epochs=12, warmup_steps=500)
    assert step_lr(0, 1000, d) == pytest.approx(3e-4 * 0.001)
    assert step_lr(250, 1000, d) == pytest.approx(3e-4 * (0.001 + 0.999 * 0.5))
    assert step_lr(8999, 1000, d) == pytest.approx(3e-4)
    assert step_lr(9000, 1000, d) == pytest.approx(3e-5) and step_lr(10999, 1000, d) == pytest.approx(3e-5)
    assert step_lr(11000, 1000, d) == pytest.approx(3e-6)
    short = d.model_copy(update={"epochs": 4.0, "warmup_steps": 0})
    assert step_lr(2999, 1000, short) == pytest.approx(3e-4) and step_lr(3000, 1000, short) == pytest.approx(3e-5)
    assert step_lr(3667, 1000, short) == pytest.approx(3e-6)


def test_detect_spec_defaults_are_the_cae_recipe_and_coco_needs_urls() -> None:
    d = DetectSpec()
    assert (d.lr, d.weight_decay, d.layer_decay, d.drop_path_rate, d.epochs) == (3e-4, 0.05, 0.75, 0.2, 12)
    assert (d.lr_steps, d.batch_size, d.betas, d.encoder, d.fpn_channels) == ((9, 11), 32, (0.9, 0.999), "student", 256)
    assert d.train_scales == tuple(range(480, 801, 32)) and (d.max_size, d.test_size) == (1333, 800)
    base = merge(TINY_EXPERIMENT, {"stages": ["pretrain", "detect"]})
    with pytest.raises(ValueError, match="detect: dataset 'coco' needs train_annotations, train_images"):
        Experiment.model_validate(base)
    with pytest.raises(ValueError, match="checkpoint: not used with init 'random'"):
        DetectSpec(init="random", checkpoint="/x.pth")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Tiny ops on a shared machine: one intra-op thread avoids OpenMP threads waiting on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("detect")
    exp = make_run(str(run), {"stages": ["pretrain", "detect"], "detect": DETECT})
    save_pretrain_checkpoint(str(run / "pretrain" / "ckpt"), exp.model)
    with one_thread():
        assert entry.main([str(run), "detect"]) == 0
    return run


@needs_fashion_mnist
def test_detect_trains_and_reports_coco_numbers(reference: Path) -> None:
    out = json.loads((reference / "detect" / "result.json").read_text())
    for kind in ("box", "mask"):
        for metric in coco_eval.METRICS:
            value = out[f"detect_{kind}_{metric}"]
            if value is None:  # no box of this size in the val set: COCO says -1, stored as null beside its reason
                assert out[f"detect_{kind}_{metric}{rundir.NONFINITE}"] == "nan"
            else:
                assert 0.0 <= value <= 100.0
    assert out["steps"] == 8 and out["epochs"] == 2.0 and out["checkpoint"].endswith("pretrain/ckpt/step-5")
    proto = out["protocol"]
    assert proto["feature_blocks"] == [0, 1, 1, 1] and proto["strides"] == [4, 8, 16, 32]
    assert proto["train_images"] == 16 and proto["val_images"] == 8 and proto["lr_schedule_steps"] == [6, 8]
    assert proto["encoder"] == "student" and proto["layer_decay"] == 0.75 and proto["drop_path_rate"] == 0.2
    records = rundir.read_jsonl(str(reference / "detect" / "metrics.jsonl"))
    assert [r["epoch"] for r in records] == [1.0, 2.0]
    assert records[-1]["box_AP"] == out["detect_box_AP"]  # both null (with .nonfinite) when the AP is undefined
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[0]["lr"] == pytest.approx(1e-3) and records[1]["lr"] == pytest.approx(1e-4)
    canvas = reference / "detect" / "canvas"
    assert COCO(str(canvas / "val" / "annotations.json")).getImgIds() == list(range(1, 9))


@needs_fashion_mnist
def test_detect_resumes_to_the_same_result(reference: Path, tmp_path: Path) -> None:
    exp = make_run(str(tmp_path), {"stages": ["pretrain", "detect"], "detect": DETECT})
    save_pretrain_checkpoint(str(tmp_path / "pretrain" / "ckpt"), exp.model)
    stage = tmp_path / "detect"
    shutil.copytree(reference / "detect" / "ckpt" / "step-4", stage / "ckpt" / "step-4")
    first = rundir.read_jsonl(str(reference / "detect" / "metrics.jsonl"))[:1]
    rundir.write_text_atomic(str(stage / "metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in first))
    with one_thread():
        assert entry.main([str(tmp_path), "detect"]) == 0
    ref = json.loads((reference / "detect" / "result.json").read_text())
    resumed = json.loads((stage / "result.json").read_text())
    drop = {"checkpoint"}
    assert json.dumps({k: v for k, v in resumed.items() if k not in drop}, sort_keys=True) == json.dumps(
        {k: v for k, v in ref.items() if k not in drop}, sort_keys=True
    )
    a, b = checkpointed_model(reference / "detect"), checkpointed_model(stage)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert rundir.read_jsonl(str(stage / "metrics.jsonl"))[-1]["loss"] == pytest.approx(
        rundir.read_jsonl(str(reference / "detect" / "metrics.jsonl"))[-1]["loss"]
    )


@needs_fashion_mnist
def test_two_processes_train_and_gather_the_evaluation(tmp_path: Path) -> None:
    """DDP over gloo: each rank evaluates half of the images; the gathered score is the one-process score."""
    exp = make_run(str(tmp_path), {"stages": ["pretrain", "detect"], "detect": {**DETECT, "eval_every_epochs": None}})
    save_pretrain_checkpoint(str(tmp_path / "pretrain" / "ckpt"), exp.model)
    proc = forked_ranks(tmp_path, "detect")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "detect" / "result.json").read_text())
    assert out["protocol"]["world_size"] == 2 and out["protocol"]["per_rank_batch"] == 2 and out["steps"] == 8
    d = exp.detect
    with one_thread():
        model = build_model(exp, d, 10, None, None)
        weights = checkpointed_model(tmp_path / "detect")
        model.load_state_dict({k.removeprefix("model."): v for k, v in weights.items()})
        world = World(0, 1, 0, torch.device("cpu"))
        _, val = detection_sets(exp, d, str(tmp_path / "detect"), world)
        alone = evaluate(model, val, list(range(len(val))), d, world, 0)
    assert rundir.dumps(alone, sort_keys=True) == json.dumps(
        {k.removeprefix("detect_"): v for k, v in out.items() if k.startswith("detect_")}, sort_keys=True
    )
