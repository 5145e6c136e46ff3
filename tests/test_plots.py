"""Figures of a small real sweep: files written and sane, and the plotted numbers are the run store's numbers."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.cli import main
from launch.runstore import results, store
from launch.sweepfile.expand import load_runs
from launch.views import plots

REPO = Path(__file__).resolve().parent.parent
SWEEP = {
    "name": "plots",
    "base": yaml.safe_load((REPO / "jobs" / "tiny.yaml").read_text())["base"] | {"stages": ["pretrain"]},
    "sweep": {
        "runs": [
            {"model.cls_token": "cait", "pretrain.seed": 0},
            {"model.cls_token": "cait", "pretrain.seed": 1},
            {"model.cls_token": "avgpool", "pretrain.seed": 0},
        ]
    },
    "launcher": {"backend": "local", "max_parallel": 3},
}
SWEEP["base"]["pretrain"] = SWEEP["base"]["pretrain"] | {"knn_monitor": True, "knn_every_epochs": 0.5}


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[store.StoredRun]]:
    """Run the sweep for real (local backend, three pretrain stages) and return its URL and runs."""
    root = tmp_path_factory.mktemp("plots")
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP | {"root": str(root / "runs")}))
    assert main(["sweep", str(path)]) == 0
    url = store.sweep_url(str(root / "runs"), "plots")
    manifest = store.read_manifest(url)
    assert manifest is not None
    return url, store.stored_runs(manifest)


def png_size(path: str) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = Path(path).read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    w, h = struct.unpack(">II", head[16:24])
    return int(w), int(h)


def logged(url: str, run_id: str, metric: str) -> dict[int, tuple[float, float]]:
    """step -> (epoch, value) straight from a run's metrics.jsonl."""
    lines = (Path(url) / run_id / "pretrain" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: (r["epoch"], r[metric]) for r in records if metric in r}


def test_figure_one_is_written_and_plots_the_logged_metrics(
    swept: tuple[str, list[store.StoredRun]], tmp_path: Path
) -> None:
    url, runs = swept
    fig = plots.plot_curves(url, runs, str(tmp_path))
    assert [Path(f).name for f in fig.files] == ["fig1_curves.png", "fig1_curves.svg"]
    w, h = png_size(fig.files[0])
    assert 1000 < w < 3000 and 400 < h < 1500
    svg = Path(fig.files[1]).read_text()
    assert svg.startswith("<?xml") and "<svg" in svg and "kNN top-1 accuracy" in svg
    ids = [r.run_id for r in runs]
    assert "sweep plots" in fig.caption and all(i in fig.caption for i in ids)
    assert set(fig.panels) == {"loss", "knn_top1"}
    cait, avgpool = ids[:2], ids[2]
    for metric, lines in fig.panels.items():
        by_label = {s.label: s for s in lines}
        assert list(by_label) == ["cait", "avgpool"]
        one = logged(url, avgpool, metric)
        s = by_label["avgpool"]
        assert s.run_ids == [avgpool] and s.x == [e for e, _ in one.values()]
        assert s.mean == [v for _, v in one.values()] and set(s.std) == {None}
        a, b = (logged(url, i, metric) for i in cait)
        s = by_label["cait"]
        assert sorted(s.run_ids) == sorted(cait) and list(a) == list(b)
        assert s.mean == pytest.approx([(a[k][1] + b[k][1]) / 2 for k in a])
        assert s.std == pytest.approx([abs(a[k][1] - b[k][1]) / math.sqrt(2) for k in a])
        assert s.count == [2] * len(a)
    assert len(fig.panels["knn_top1"][0].x) == 1 + 4 / 2  # at init, every half epoch (4 steps of 16 of 64 images)


def test_metric_against_an_axis_uses_the_result_files(swept: tuple[str, list[store.StoredRun]], tmp_path: Path) -> None:
    url, runs = swept
    table = results.collect(url, runs)
    fig = plots.plot_metric(table, "model.cls_token", "knn_top1", str(tmp_path), sweep_name="plots")
    (line,) = fig.panels["knn_top1"]
    final = {r.run_id: json.loads((Path(url) / r.run_id / "pretrain" / "result.json").read_text()) for r in runs}
    ids = [r.run_id for r in runs]
    assert line.x == ["cait", "avgpool"] and line.count == [2, 1]
    assert line.mean == pytest.approx(
        [(final[ids[0]]["knn_top1"] + final[ids[1]]["knn_top1"]) / 2, final[ids[2]]["knn_top1"]]
    )
    w, h = png_size(fig.files[0])
    assert 600 < w < 2000 and 400 < h < 1500


def test_plot_sweep_draws_every_figure_without_torch(swept: tuple[str, list[store.StoredRun]], tmp_path: Path) -> None:
    url, _ = swept
    code = (
        "import sys; from launch.runstore import results, store; from launch.views import plots; "
        f"url = {url!r}; runs = store.stored_runs(store.read_manifest(url)); "
        f"figs = plots.plot_sweep(url, runs, results.collect(url, runs), {str(tmp_path)!r}); "
        "print(' '.join(f.name for f in figs)); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    names = proc.stdout.split()
    assert names == ["fig1_curves", "knn_top1_pretrain_vs_cls_token", "knn_gain_top1_pretrain_vs_cls_token"]
    for name in names:
        for fmt in ("png", "svg"):
            assert (tmp_path / f"{name}.{fmt}").stat().st_size > 5000


@pytest.mark.parametrize("recipe", ["recipes/fmnist_vit_nano.yaml", "recipes/vit_small_in1k.yaml"])
def test_the_ablation_sweep_runs_the_same_axes_locally_and_on_a_cluster(recipe: str, tmp_path: Path) -> None:
    text = (REPO / "jobs" / "ablation.yaml").read_text()
    assert "\ninclude: recipes/fmnist_vit_nano.yaml\n" in text
    switched = tmp_path / "ablation.yaml"
    switched.write_text(text.replace("recipes/fmnist_vit_nano.yaml", str(REPO / "jobs" / recipe)))
    # A cluster recipe's s3:// root needs s3fs where it is submitted; here the store goes to a local directory.
    sweep, runs = load_runs(switched, root=str(tmp_path / "runs"))
    assert [r.overrides for r in runs] == [
        {"model.cls_token": design, "pretrain.seed": seed} for design in ("cait", "vit", "avgpool") for seed in (0, 1)
    ]
    for r in runs:
        e = r.experiment
        assert (e.pretrain.masking.ratio, e.pretrain.masking.num_masks, e.stages) == (0.9, 8, ("pretrain",))
        assert e.pretrain.knn_monitor
    local = recipe.startswith("recipes/fmnist")
    assert sweep.launcher.backend == ("local" if local else "slurm")
    assert {r.experiment.model.arch for r in runs} == {"vit_nano" if local else "vit_small"}
    if local:  # the same number of optimizer steps for every design
        assert {r.experiment.pretrain.steps for r in runs} == {500}
        assert {r.experiment.data.dataset for r in runs} == {"fashion_mnist"}
    else:  # epochs of one dataset at one batch size: the same steps too
        assert {(r.experiment.pretrain.epochs, r.experiment.pretrain.batch_size) for r in runs} == {(300, 2048)}


def test_the_masking_sweep_covers_ratio_by_masks_with_two_seeds() -> None:
    sweep, runs = load_runs(REPO / "jobs" / "masking.yaml")
    grid = {(r.overrides["pretrain.masking.ratio"], r.overrides["pretrain.masking.num_masks"]) for r in runs}
    assert grid == {(r, m) for r in (0.75, 0.85, 0.9) for m in (1, 2, 4)} and len(runs) == 18
    assert {r.experiment.pretrain.steps for r in runs} == {500} and sweep.launcher.backend == "local"
