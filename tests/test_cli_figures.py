"""`extrema-launch results --group-by/--pivot`, `plot`, `viz attention` and `status --watch` on a real small sweep."""

from __future__ import annotations

import argparse
import io
import json
import os
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from rich.console import Console

from extrema.run.contract import update_status
from launch.addressed import open_addressed
from launch.runstore import store
from launch.sweepfile.expand import load_runs
from launch.views import plots, tables
from launch.views.results_view import collect, results_view, show_view
from tests.processes import interruptible
from tests.test_cli import TINY, cli

DESIGNS = ("cait", "avgpool")
SWEEP: dict[str, Any] = yaml.safe_load(TINY.read_text())
SWEEP["name"] = "figures"
SWEEP["base"]["stages"] = ["pretrain"]
SWEEP["base"]["pretrain"]["knn_monitor"] = True  # kNN at start and end: curves and a result metric
SWEEP["sweep"] = {
    "grid": {"pretrain.seed": [0, 1], "model.cls_token": list(DESIGNS), "pretrain.masking.num_masks": [2]}
}
SWEEP["launcher"]["max_parallel"] = 4


@dataclass(frozen=True)
class Swept:
    """The finished sweep: its store URL, and each run's id, design, seed and pretrain result.json."""

    url: str
    runs: list[dict[str, Any]]

    def run_of(self, design: str, seed: int = 0) -> str:
        return next(r["run_id"] for r in self.runs if (r["design"], r["seed"]) == (design, seed))


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Swept:
    """Run the sweep for real on the local backend (4 pretrain stages) and read its results back by hand."""
    root = tmp_path_factory.mktemp("figures")
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(SWEEP | {"root": str(root / "runs")}))
    code, out, err = cli("sweep", str(path))
    assert code == 0, out + err
    url = store.sweep_url(str(root / "runs"), "figures")
    manifest = store.read_manifest(url)
    assert manifest is not None
    runs = []
    for r in manifest["runs"]:
        result = json.loads((Path(url) / r["run_id"] / "pretrain" / "result.json").read_text())
        design, seed = r["overrides"]["model.cls_token"], r["overrides"]["pretrain.seed"]
        runs.append({"run_id": r["run_id"], "design": design, "seed": seed, "result": result})
    return Swept(url, runs)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    w, h = struct.unpack(">II", head[16:24])
    return int(w), int(h)


def assert_figure(png: Path) -> None:
    """A PNG of sane size and its SVG twin, both non-empty."""
    svg = png.with_suffix(".svg")
    assert png.stat().st_size > 1000 and svg.stat().st_size > 1000
    w, h = png_size(png)
    assert 200 <= w <= 5000 and 200 <= h <= 5000
    assert "<svg" in svg.read_text()[:2000]


def test_group_by_gives_the_hand_computed_means_over_seeds(swept: Swept, tmp_path: Path) -> None:
    code, out, err = cli("results", swept.url, "--group-by", "model.cls_token", "--format", "json")
    assert code == 0, err
    rows = json.loads(out)
    assert [(r["stage"], r["model.cls_token"]) for r in rows] == [("pretrain", d) for d in DESIGNS]
    for row in rows:
        mine = [r for r in swept.runs if r["design"] == row["model.cls_token"]]
        assert sorted(row["pretrain.seed"]) == [0, 1] and sorted(row["run_ids"]) == sorted(r["run_id"] for r in mine)
        assert row["runs"] == row["completed"] == 2
        for metric in ("knn_top1", "loss_final"):
            values = [r["result"][metric] for r in mine]
            assert row[f"{metric}.mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
            assert row[f"{metric}.std"] == pytest.approx(statistics.stdev(values), rel=1e-9, abs=1e-12)
            assert row[f"{metric}.count"] == 2

    code, out, _ = cli("results", swept.url, "--group-by")  # every swept axis but the seed, on the terminal
    assert code == 0 and "mean ± std over" in out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if line.startswith("│")}
    assert lines["model.cls_token"].index("cait") < lines["model.cls_token"].index("avgpool")  # a column per group
    for design in DESIGNS:
        values = [r["result"]["loss_final"] for r in swept.runs if r["design"] == design]
        assert f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g} (n=2)" in lines["loss_final"]

    parquet = tmp_path / "agg.parquet"
    code, out, _ = cli("results", swept.url, "--group-by", "model.cls_token", "--out", str(parquet))
    assert code == 0 and "wrote 2 rows" in out
    table = pq.read_table(parquet)
    assert table.column("model.cls_token").to_pylist() == list(DESIGNS)
    assert table.column("knn_top1.mean").to_pylist() == [r["knn_top1.mean"] for r in rows]


def test_plain_results_fit_an_80_column_terminal(swept: Swept) -> None:
    target = open_addressed(swept.url, None)
    table, _, _ = collect(target)
    view = results_view(argparse.Namespace(group_by=None, pivot=None), swept.url, table)
    assert tables.table_width([max(len(h), 10) for h in view.header]) > 80  # too wide as one table
    buf = io.StringIO()
    show_view(Console(file=buf, width=80), view)
    text = buf.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for r in swept.runs:  # each run's id and metrics stay whole, to 4 significant digits
        rows = [line for line in text.splitlines() if line.startswith(f"│ {r['run_id']} ")]
        assert len(rows) >= 2, text  # one line per split table
        assert any(f"{r['result']['loss_final']:.4g}" in line for line in rows)
        assert any(f"{r['result']['knn_top1']:.4g}" in line for line in rows)
    assert "the same in every row: state completed" in text and "backend local" in text
    assert "…" not in text  # nothing squeezed into ellipses


def test_pivot_lays_a_metric_out_axis_by_axis(swept: Swept) -> None:
    code, out, err = cli(
        "results", swept.url, "--pivot", "model.cls_token", "pretrain.masking.num_masks", "--metric", "loss_final"
    )
    assert code == 0, err
    assert "model.cls_token \\ pretrain.masking.num_masks" in out and "loss_final" in out
    for design in DESIGNS:
        values = [r["result"]["loss_final"] for r in swept.runs if r["design"] == design]
        cell = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n=2)"
        assert any(design in line and cell in line for line in out.splitlines()), (cell, out)

    code, out, _ = cli(
        "results", swept.url, "--pivot", "model.cls_token", "pretrain.seed", "--metric", "knn_top1", "--format", "json"
    )
    assert code == 0
    by_design = {r["model.cls_token"]: r for r in json.loads(out)}
    assert list(by_design) == list(DESIGNS)
    for r in swept.runs:
        cell = by_design[r["design"]]
        assert cell[f"pretrain.seed={r['seed']}"] == r["result"]["knn_top1"]
        assert cell[f"pretrain.seed={r['seed']}.count"] == 1 and cell[f"pretrain.seed={r['seed']}.std"] is None


def test_plot_writes_png_and_svg_figures(swept: Swept, tmp_path: Path) -> None:
    out_dir = tmp_path / "figs"
    code, out, err = cli("plot", swept.url, "--out", str(out_dir))
    assert code == 0, err
    written = sorted(p.name for p in out_dir.iterdir())
    for name in ("fig1_curves", "knn_top1_pretrain_vs_cls_token", "knn_top1_pretrain_vs_num_masks"):
        assert f"{name}.png" in written and f"{name}.svg" in written
    for png in out_dir.glob("*.png"):
        assert_figure(png)
    names = "".join(out.split())  # the files table may wrap long paths
    assert all(name in names for name in written), out


def raised_copy(url: str, to: Path) -> str:
    """A second completed sweep: the store at `url` copied to `to`, each pretrain loss logged raised by 1 and each
    kNN top-1 result raised by 10 (its ledger dropped, so the stages' own records are read)."""
    shutil.copytree(url, to)
    shutil.rmtree(to / "ledger", ignore_errors=True)
    for log in to.glob("*/pretrain/metrics.jsonl"):
        records = [json.loads(line) for line in log.read_text().splitlines()]
        raised = [r | {"loss": r["loss"] + 1} if "loss" in r else r for r in records]
        log.write_text("".join(json.dumps(r) + "\n" for r in raised))
    for path in to.glob("*/pretrain/result.json"):
        result = json.loads(path.read_text())
        path.write_text(json.dumps(result | {"knn_top1": result["knn_top1"] + 10}))
    return str(to)


def test_plot_of_two_sweeps_draws_each_sweep_labelled(
    swept: Swept, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = raised_copy(swept.url, tmp_path / "other" / "figures")
    drawn: list[plots.Plotted] = []
    plot_sweeps = plots.plot_sweeps
    monkeypatch.setattr(plots, "plot_sweeps", lambda *a, **k: drawn.extend(plot_sweeps(*a, **k)) or drawn)
    code, out, err = cli("plot", swept.url, other, "--out", str(tmp_path / "figs"))
    assert code == 0, err
    assert other in "".join(out.split()) and swept.url in "".join(out.split())
    figs = {f.name: f for f in drawn}
    for name in ("fig1_curves", "knn_top1_pretrain_vs_sweep", "knn_top1_pretrain_vs_cls_token"):
        assert_figure(tmp_path / "figs" / f"{name}.png")
    mine, theirs = "runs/figures", "other/figures"  # the sweeps' names: the shortest ends of their URLs that differ

    curves = {s.label: s for s in figs["fig1_curves"].panels["loss"]}  # a line per design and sweep
    for design in DESIGNS:
        first, second = (curves[f"cls_token={design}, sweep={n}, num_masks=2"] for n in (mine, theirs))
        assert first.x == second.x and max(first.count) == max(second.count) == 2
        assert second.mean == pytest.approx([m + 1 for m in first.mean], rel=1e-9)  # each sweep's own logs
        ids = sorted(r["run_id"] for r in swept.runs if r["design"] == design)
        assert sorted(second.run_ids) == [f"{theirs}/{i}" for i in ids]
    assert "sweeps runs/figures, other/figures" in figs["fig1_curves"].caption

    (by_sweep,) = [
        s for s in figs["knn_top1_pretrain_vs_sweep"].panels["knn_top1"] if s.label == "cls_token=cait, num_masks=2"
    ]
    values = [r["result"]["knn_top1"] for r in swept.runs if r["design"] == "cait"]
    assert by_sweep.x == [mine, theirs] and by_sweep.count == [2, 2]
    assert by_sweep.mean == pytest.approx([statistics.mean(values), statistics.mean(values) + 10], rel=1e-9)
    lines = {s.label: s for s in figs["knn_top1_pretrain_vs_cls_token"].panels["knn_top1"]}
    assert list(lines) == [f"sweep={n}, num_masks=2" for n in (mine, theirs)]  # a line per sweep
    assert lines[f"sweep={theirs}, num_masks=2"].x == list(DESIGNS)

    code, out, err = cli("plot", swept.url, other, swept.url, "--out", str(tmp_path / "twice"))
    assert code == 2 and f"the same sweep given twice: {swept.url}" in err
    assert not (tmp_path / "twice").exists()


def test_viz_attention_writes_the_attention_figure(swept: Swept, tmp_path: Path) -> None:
    run = swept.run_of("cait")
    code, out, err = cli(
        "viz", "attention", swept.url, "--run", run, "--images", "0", "1", "--queries", "cls", "5",
        "--out", str(tmp_path / "att"),
    )  # fmt: skip
    assert code == 0, err
    assert_figure(tmp_path / "att" / "attention.png")
    assert str(tmp_path / "att" / "attention.png") in out

    other = swept.run_of("avgpool", 1)  # default queries (no class token in this design), default --out
    code, _, err = cli("viz", "attention", swept.url, "--run", other, "--images", "3", "--branch", "student")
    assert code == 0, err
    assert_figure(Path(swept.url) / other / "viz" / "attention.png")


def test_status_watch_on_a_finished_sweep_returns_at_once(swept: Swept) -> None:
    start = time.monotonic()
    code, out, _ = cli("status", swept.url, "--watch", "--interval", "30")
    assert code == 0 and time.monotonic() - start < 10
    assert out.count("completed") == 4 and "all 4 stages have ended" in out


def in_flight_store(root: Path) -> tuple[str, str]:
    """The tiny sweep's store with every stage completed but one, running under a live local sweep (this process)."""
    _, runs = load_runs(TINY)
    url = store.sweep_url(str(root), "tiny")
    job = f"local-{os.getpid()}-0@{os.uname().nodename}"
    for r in runs:
        for stage in r.stages:
            update_status(store.stage_url(url, r.run_id, stage), state="completed", backend="local", job_id=job)
    live = store.stage_url(url, runs[-1].run_id, "knn")
    update_status(live, state="running")
    return url, live


def test_status_watch_waits_until_every_stage_has_ended(tmp_path: Path) -> None:
    _, live = in_flight_store(tmp_path / "runs")
    threading.Timer(1.0, update_status, args=(live,), kwargs={"state": "failed", "error": "boom"}).start()
    start = time.monotonic()
    code, out, _ = cli("status", str(TINY), "--root", str(tmp_path / "runs"), "--watch", "--interval", "0.2")
    assert time.monotonic() - start >= 1.0, "returned before the running stage ended"
    assert code == 1 and "all 4 stages have ended" in out and "boom" in out

    code, out, _ = cli("plot", str(TINY), "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "figs"))
    assert code == 1 and "nothing to plot yet" in out and not (tmp_path / "figs").exists()  # no metrics anywhere


def test_ctrl_c_stops_watching_with_130(tmp_path: Path) -> None:
    in_flight_store(tmp_path / "runs")
    command = [sys.executable, "-m", "launch.cli", "status", str(TINY), "--root", str(tmp_path / "runs"), "--watch"]
    env = {**os.environ, "FORCE_COLOR": "1", "COLUMNS": "160"}  # a live display that draws at once
    proc = subprocess.Popen(
        [*command, "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        preexec_fn=interruptible,
    )  # fmt: skip
    seen, deadline = b"", time.monotonic() + 30
    assert proc.stdout is not None
    while b"stages ended" not in seen and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            seen += os.read(proc.stdout.fileno(), 65536)
    footer = seen[seen.rindex(b"stages ended") - 40 :]
    assert b"3 of 4 stages ended" in footer, footer
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=90)  # a loaded CI machine can take long to unwind
    assert proc.returncode == 130 and b"Traceback" not in err, err.decode()


def test_bad_usage_exits_2_and_writes_nothing(swept: Swept, tmp_path: Path) -> None:
    cait, avgpool = swept.run_of("cait"), swept.run_of("avgpool")
    cases = [
        (["results", swept.url, "--group-by", "no.such", "--out", str(tmp_path / "a.json")], "not a swept axis"),
        (["results", swept.url, "--pivot", "model.cls_token", "pretrain.seed", "--out", str(tmp_path / "p.csv")],
         "needs --metric"),
        (["results", swept.url, "--metric", "knn_top1"], "go with --pivot"),
        (["results", swept.url, "--group-by", "--pivot", "a", "b"], "not allowed with"),
        (["results", swept.url, "--pivot", "model.cls_token", "model.cls_token", "--metric", "knn_top1"], "same axis"),
        (["results", swept.url, "--pivot", "model.cls_token", "pretrain.seed", "--metric", "nope"], "no numeric"),
        (["plot", swept.url, "--out", str(tmp_path / "figs"), "--axis", "nope"], "--axis nope is not a swept axis"),
        (["plot", swept.url], "--out"),
        (["viz", "attention", swept.url, "--run", "nope"], "run 'nope' is not part of"),
        (["viz", "attention", swept.url, "--run", cait, "--images", "999", "--out", str(tmp_path / "att")],
         "outside the val split"),
        (["viz", "attention", swept.url, "--run", avgpool, "--queries", "cls", "--out", str(tmp_path / "att")],
         "no class token"),
        (["viz", "attention", swept.url, "--run", cait, "--queries", "x"], "neither cls nor a patch index"),
        (["viz", swept.url], "invalid choice"),
        (["status", swept.url, "--watch", "--interval", "0"], "not a positive number"),
    ]  # fmt: skip
    for args, message in cases:
        code, out, err = cli(*args)
        assert code == 2 and message in err, (args, out, err)
        assert "Traceback" not in out + err
    assert sorted(os.listdir(tmp_path)) == []
    assert not any((Path(swept.url) / r).joinpath("viz").exists() for r in (cait, avgpool))
