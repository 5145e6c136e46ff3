"""Aggregation over seeds and the pivot, against hand-computed means and standard deviations."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
import pytest

from launch.runstore import results
from launch.views import aggregate


def row(run_id: str, stage: str, state: str = "completed", **values: Any) -> dict[str, Any]:
    """A results row as `launch.runstore.results.rows` makes it: swept values are dotted keys, the rest metrics."""
    out = {"run_id": run_id, "stage": stage, "state": state, "git_sha": "abc", "world_size": 1}
    out.update({k.replace("__", "."): v for k, v in values.items()})
    return out


def design_table() -> pa.Table:
    records = [
        row("c0", "pretrain", model__cls_token="cait", pretrain__seed=0, knn_top1=60.0, loss_final=1.0),
        row("c1", "pretrain", model__cls_token="cait", pretrain__seed=1, knn_top1=64.0, loss_final=1.5),
        row("a0", "pretrain", model__cls_token="avgpool", pretrain__seed=0, knn_top1=50.0, loss_final=0.5),
        row("a1", "pretrain", model__cls_token="avgpool", pretrain__seed=1, knn_top1=53.0, loss_final=0.7),
        row("a2", "pretrain", model__cls_token="avgpool", pretrain__seed=2, knn_top1=59.0, loss_final=0.9),
        row("v0", "pretrain", model__cls_token="vit", pretrain__seed=0, knn_top1=70.0, loss_final=2.0),
        row("v1", "pretrain", "failed", model__cls_token="vit", pretrain__seed=1),
        row("c0", "knn", model__cls_token="cait", pretrain__seed=0, knn_top1=61.0, protocol__k=20),
        row("c1", "knn", model__cls_token="cait", pretrain__seed=1, knn_top1=65.0, protocol__k=20),
    ]
    records[4]["git_sha"] = "def"  # one avgpool run from another commit
    return results.to_table(records)


def test_axes_seeds_and_metrics_are_told_apart() -> None:
    t = design_table()
    assert aggregate.swept_axes(t) == ["model.cls_token", "pretrain.seed"]
    assert aggregate.seed_axes(aggregate.swept_axes(t)) == ["pretrain.seed"]
    assert aggregate.metric_columns(t) == ["knn_top1", "loss_final"]


def test_mean_std_count_match_hand_computed_values() -> None:
    agg = aggregate.aggregate(design_table())
    rows = {(r["stage"], r["model.cls_token"]): r for r in agg.to_pylist()}
    assert list(rows) == [("pretrain", "cait"), ("pretrain", "avgpool"), ("pretrain", "vit"), ("knn", "cait")]
    cait = rows["pretrain", "cait"]
    assert cait["knn_top1.mean"] == 62.0 and cait["knn_top1.std"] == pytest.approx(math.sqrt(8))
    assert cait["loss_final.mean"] == 1.25 and cait["loss_final.std"] == pytest.approx(math.sqrt(0.125))
    assert cait["knn_top1.count"] == 2 and cait["run_ids"] == ["c0", "c1"] and cait["pretrain.seed"] == [0, 1]
    avg = rows["pretrain", "avgpool"]
    # 50, 53, 59: mean 54, deviations -4, -1, 5, sum of squares 42, sample variance 21
    assert avg["knn_top1.mean"] == 54.0 and avg["knn_top1.std"] == pytest.approx(math.sqrt(21))
    assert avg["knn_top1.count"] == 3 and avg["runs"] == 3
    assert avg["git_sha"] is None  # the group's rows disagree, so no single commit is claimed
    vit = rows["pretrain", "vit"]
    assert (vit["runs"], vit["completed"], vit["knn_top1.count"]) == (2, 1, 1)
    assert vit["knn_top1.mean"] == 70.0 and vit["knn_top1.std"] is None
    knn = rows["knn", "cait"]
    assert knn["knn_top1.mean"] == 63.0 and knn["protocol.k"] == 20 and knn["git_sha"] == "abc"
    assert knn["loss_final.count"] == 0 and knn["loss_final.mean"] is None
    assert agg.schema.field("knn_top1.count").type == pa.int64()
    assert agg.schema.field("pretrain.seed").type == pa.list_(pa.int64())


def test_grouping_by_the_seed_keeps_every_run_apart() -> None:
    agg = aggregate.aggregate(design_table(), by=["model.cls_token", "pretrain.seed"])
    assert agg.num_rows == 9
    assert set(agg.column("knn_top1.count").to_pylist()) <= {0, 1}


def ratio_table() -> pa.Table:
    """masking ratio x number of masks x two seeds; value = 100 * ratio + num_masks + seed / 10."""
    records = []
    for ratio in (0.9, 0.75):
        for masks in (2, 4, 8):
            for seed in (0, 1):
                values = {
                    "pretrain.masking.ratio": ratio,
                    "pretrain.masking.num_masks": masks,
                    "pretrain.seed": seed,
                    "knn_top1": 100 * ratio + masks + seed / 10,
                }
                records.append({"run_id": f"r{ratio}-{masks}-{seed}", "stage": "pretrain", "state": "completed"})
                records[-1].update(values)
    return results.to_table(records)


def test_pivot_lays_out_means_over_seeds() -> None:
    p = aggregate.pivot(ratio_table(), "pretrain.masking.ratio", "pretrain.masking.num_masks", "knn_top1")
    assert p.stage == "pretrain"
    assert p.row_values == [0.75, 0.9] and p.column_values == [2, 4, 8]  # numbers sorted
    for i, ratio in enumerate(p.row_values):
        for j, masks in enumerate(p.column_values):
            assert p.mean[i][j] == pytest.approx(100 * ratio + masks + 0.05)
            assert p.std[i][j] == pytest.approx(0.1 / math.sqrt(2))
            assert p.count[i][j] == 2
    arrow = p.to_arrow()
    assert arrow.column_names[:4] == [
        "pretrain.masking.ratio",
        "pretrain.masking.num_masks=2",
        "pretrain.masking.num_masks=2.std",
        "pretrain.masking.num_masks=2.count",
    ]
    assert arrow.column("pretrain.masking.num_masks=8").to_pylist() == pytest.approx([83.05, 98.05])
    assert p.header() == ["pretrain.masking.ratio \\ pretrain.masking.num_masks", "2", "4", "8"]
    assert p.text()[0] == ["0.75", "77.05 ± 0.07 (n=2)", "79.05 ± 0.07 (n=2)", "83.05 ± 0.07 (n=2)"]


def test_pivot_leaves_empty_cells_empty_and_shows_single_seeds() -> None:
    t = design_table()
    p = aggregate.pivot(t, "model.cls_token", "pretrain.seed", "knn_top1", stage="pretrain")
    assert p.row_values == ["cait", "avgpool", "vit"] and p.column_values == [0, 1, 2]
    assert p.mean[2] == [70.0, None, None] and p.count[2] == [1, 0, 0]
    assert p.text()[2] == ["vit", "70.00 (n=1)", "-", "-"]


def test_pivot_and_grouping_refuse_what_would_mix_experiments() -> None:
    t = ratio_table()
    with pytest.raises(ValueError, match=r"differ in pretrain\.masking\.num_masks, not only in seed"):
        aggregate.aggregate(t, by=["pretrain.masking.ratio"])
    with pytest.raises(ValueError, match=r"not a swept axis: model\.cls_token"):
        aggregate.aggregate(t, by=["model.cls_token"])
    with pytest.raises(ValueError, match="no numeric metric 'probe_top1'"):
        aggregate.pivot(t, "pretrain.masking.ratio", "pretrain.masking.num_masks", "probe_top1")
    with pytest.raises(ValueError, match="reported by stages pretrain, knn: choose one"):
        aggregate.pivot(design_table(), "model.cls_token", "pretrain.seed", "knn_top1")


def test_summary_puts_each_metric_in_one_cell() -> None:
    header, lines = aggregate.summary(aggregate.aggregate(design_table()))
    assert header == ["stage", "model.cls_token", "runs", "knn_top1", "loss_final"]
    assert lines[0] == ["pretrain", "cait", "2/2", "62 ± 2.8 (n=2)", "1.25 ± 0.35 (n=2)"]
    assert lines[2] == ["pretrain", "vit", "1/2", "70 (n=1)", "2 (n=1)"]
    assert lines[3] == ["knn", "cait", "2/2", "63 ± 2.8 (n=2)", "-"]
