"""Figure 2's scores: the 60%-mass rule, Jaccard, connected components and CorLoc by hand; the stage end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from extrema import entry
from extrema.eval import locality
from tests.stage_runs import make_run


def test_keep_mass_keeps_the_fewest_top_entries_holding_the_mass() -> None:
    attention = torch.tensor([[0.05, 0.5, 0.1, 0.3, 0.05]])
    # Sorted high to low: 0.5, 0.3 hold 0.8 >= 0.6; 0.5 alone holds 0.5 < 0.6.
    assert locality.keep_mass(attention, 0.6).tolist() == [[False, True, False, True, False]]
    assert locality.keep_mass(attention, 0.4).tolist() == [[False, True, False, False, False]]
    assert locality.keep_mass(attention * 7, 0.6).tolist() == locality.keep_mass(attention, 0.6).tolist()


def test_jaccard_and_upsampling() -> None:
    kept = torch.tensor([[[True, False], [False, False]]])
    pixels = locality.upsample(kept, (4, 4))
    assert pixels.sum() == 4 and pixels[0, :2, :2].all()
    truth = torch.zeros(1, 4, 4, dtype=torch.bool)
    truth[0, :2, :3] = True  # 6 pixels, 4 shared
    assert locality.jaccard(pixels, truth).item() == pytest.approx(4 / 6)
    empty = torch.zeros(1, 4, 4, dtype=torch.bool)
    assert locality.jaccard(empty, empty).item() == 0.0


def test_largest_component_box_and_corloc() -> None:
    mask = torch.zeros(2, 5, 6, dtype=torch.bool)
    mask[0, 0, 0] = True  # a lone cell
    mask[0, 2:4, 1:5] = True  # the largest component: rows 2-3, columns 1-4
    mask[0, 4, 5] = True  # diagonal to nothing: its own component
    labels = locality.components(mask)
    assert len(labels[0].unique()) == 4  # background and three components
    boxes = locality.largest_component_box(mask)
    assert boxes[0].tolist() == [1.0, 2.0, 5.0, 4.0] and boxes[1].tolist() == [0.0, 0.0, 0.0, 0.0]
    truth = [torch.tensor([[4.0, 8.0, 20.0, 16.0], [0.0, 0.0, 1.0, 1.0]]), torch.zeros(0, 4)]
    hits = locality.corloc_hits(boxes * 4, truth)
    assert hits.tolist() == [True, False]
    iou = locality.box_iou(torch.tensor([0.0, 0.0, 2.0, 2.0]), torch.tensor([[1.0, 0.0, 3.0, 2.0]]))
    assert iou.item() == pytest.approx(1 / 3)


def test_score_maps_on_a_map_that_is_the_object() -> None:
    attention = torch.full((1, 4, 4), 0.01)
    attention[0, 1:3, 1:3] = 1.0
    foreground = torch.zeros(1, 16, 16, dtype=torch.bool)
    foreground[0, 4:12, 4:12] = True
    box = [torch.tensor([[4.0, 4.0, 12.0, 12.0]])]
    scored = locality.score_maps(attention, foreground, box, 4, 0.9)  # the four object cells hold 97%
    assert scored["jaccard"].item() == 1.0 and scored["corloc"].item()
    scored = locality.score_maps(attention, foreground, box, 4, 0.6)  # three of them hold 73%: an L of 3 cells
    assert scored["kept"].sum() == 3 and scored["jaccard"].item() == pytest.approx(0.75)
    assert scored["corloc"].item()  # its box is the object's box


def test_locality_stage_scores_class_token_designs_and_skips_avgpool(tmp_path: Path) -> None:
    canvas = str(tmp_path / "canvas")
    settings = {"init": "random", "canvas_images": 24, "canvas_size": 32, "canvas_dir": canvas, "batch_size": 16}
    results = {}
    for design in ("cait", "vit", "avgpool"):
        run_dir = str(tmp_path / design)
        make_run(run_dir, {"model": {"cls_token": design}, "stages": ["locality"], "locality": settings})
        results[design] = entry.run_stage(run_dir, "locality")
        assert json.loads((tmp_path / design / "locality" / "result.json").read_text()) == results[design]
    for design in ("cait", "vit"):
        r = results[design]
        assert r["locality_applicable"] and r["images"] == 24 and r["checkpoint"] is None
        assert 0 < r["locality_jaccard"] < 100 and 0 <= r["locality_corloc"] <= 100
        assert (
            r["locality_jaccard_best_head"] == max(r["locality_jaccard_heads"])
            and len(r["locality_jaccard_heads"]) == 2
        )
    assert results["avgpool"]["locality_applicable"] is False and "locality_jaccard" not in results["avgpool"]
    annotations = json.loads((tmp_path / "canvas" / "annotations.json").read_text())
    assert all(a["segmentation"]["counts"] for a in annotations["annotations"])  # the canvases carry masks
