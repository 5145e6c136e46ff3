"""What a run's id hashes: settings that change results do, settings that change only how a stage runs (loader
processes, cadences, retention, object-store access, the dataset's location under a name) do not; a store swept
under the earlier rule keeps its runs, found under their earlier ids, with their results."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import pytest

from launch.cli.app import main as cli_main
from launch.inputs.errors import InvalidSweep
from launch.sweepfile import expand, schema
from launch.sweepfile.expand import load_runs
from launch.sweepfile.model import RunIds, run_id

REPO = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden"

BASE = """\
name: ident
base:
  model: {arch: vit_pico, mlp_dim: 64, proj_dim: 32, drop_path_rate: 0.0}
  data: {dataset: synthetic, synthetic_size: 64, num_workers: 0}
  stages: [pretrain]
  pretrain: {steps: 2, batch_size: 16, warmup_epochs: 0, log_every: 1, ckpt_every: 2, knn_monitor: false,
             masking: {ratio: 0.75, num_masks: 2}}
launcher: {backend: local, resources: {cpus_per_task: 1, time_min: 5}}
"""

OUTSIDE = [
    "data.num_workers=3",
    "data.cache_dir=/elsewhere",
    "data.storage={endpoint_url: 'http://10.0.0.1:9000', retries: 7, cache_bytes: 1000000}",
    "pretrain.log_every=7",
    "pretrain.ckpt_every=50",
    "pretrain.async_save=true",
    "pretrain.keep_last=5",
    "pretrain.keep_every=100",
    "pretrain.knn_every_epochs=2",
    "probe.ckpt_every=9",
    "finetune.keep_last=4",
    "detect.log_every=3",
    "detect.eval_every_epochs=1",
]
INSIDE = ["pretrain.seed=1", "pretrain.steps=3", "data.crop_min=0.3", "pretrain.precision=fp32", "data.name=fmnist"]


def the_id(path: Path, *overrides: str) -> str:
    return load_runs(str(path), overrides=list(overrides))[1][0].run_id


@pytest.fixture()
def base(tmp_path: Path) -> Path:
    path = tmp_path / "ident.yaml"
    path.write_text(BASE + f"root: {tmp_path / 'runs'}\n")
    return path


@pytest.mark.parametrize("setting", OUTSIDE)
def test_a_setting_outside_the_identity_keeps_the_run_id(base: Path, setting: str) -> None:
    assert the_id(base, setting) == the_id(base)


@pytest.mark.parametrize("setting", INSIDE)
def test_a_setting_that_changes_results_changes_the_run_id(base: Path, setting: str) -> None:
    assert the_id(base, setting) != the_id(base)


def test_a_named_dataset_keeps_its_runs_where_it_lives(tmp_path: Path) -> None:
    path = tmp_path / "folder.yaml"
    path.write_text(BASE.replace("dataset: synthetic, synthetic_size: 64", "dataset: imagefolder, root: /data/a"))
    moved = "data.root=s3://bucket/copy-of-a"
    assert the_id(path, moved) != the_id(path)  # unnamed, the location is what tells datasets apart
    assert the_id(path, "data.name=inet", moved) == the_id(path, "data.name=inet")
    assert the_id(path, "data.name=inet") != the_id(path, "data.name=other")


def test_an_axis_over_settings_outside_the_identity_is_refused_as_the_same_experiment(base: Path) -> None:
    base.write_text(base.read_text() + "sweep: {grid: {data.num_workers: [0, 2]}}\n")
    with pytest.raises(InvalidSweep) as info:
        load_runs(str(base))
    assert "runs 1 and 2 are the same experiment" in info.value.problems[0].render()


@pytest.mark.parametrize("sweep", ["jobs/tiny.yaml", "tests/golden/axes.yaml"])
def test_earlier_ids_are_those_stores_hold(sweep: str) -> None:
    """Ids by the rule before 2026-12 equal the ids golden files held then (tests/golden/*.earlier.json)."""
    _, runs = load_runs(str(REPO / sweep))
    name = Path(sweep).stem
    earlier = json.loads((GOLDEN / f"{name}.earlier.json").read_text())
    assert [run_id(r.experiment, earlier=True) for r in runs] == [e["run_id"] for e in earlier]
    assert [r.overrides for r in runs] == [e["overrides"] for e in earlier]


def cli(*args: str) -> tuple[int, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        code = cli_main(list(args))
    return code, buf.getvalue()


def test_a_store_swept_under_the_earlier_rule_keeps_its_completed_run(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep run by the earlier rule (its ids: `RunIds(earlier=True)`), swept again by the current one: the run is
    found under the directory it has, completed, with its result; nothing runs again, nothing is renamed."""
    with monkeypatch.context() as m:
        m.setattr(expand, "RunIds", lambda: RunIds(earlier=True))
        code, out = cli("sweep", str(base), "--snapshot", "off", "--quiet")
        assert code == 0, out
    sweep_dir = tmp_path / "runs" / "ident"
    run = load_runs(str(base))[1][0]
    new, old = run.run_id, run_id(run.experiment, earlier=True)
    assert new != old and (sweep_dir / old / "pretrain" / "result.json").is_file()
    code, out = cli("status", str(base), "--json")
    assert code == 0, out
    assert [(r["run"], r["stage"], r["state"]) for r in json.loads(out)] == [(old, "pretrain", "completed")]
    code, out = cli("sweep", str(base), "--snapshot", "off", "--quiet")
    assert code == 0 and "nothing to submit" in out, out
    code, out = cli("results", str(base), "--out", str(tmp_path / "r.csv"))
    assert code == 0 and old in (tmp_path / "r.csv").read_text(), out
    assert sorted(os.listdir(sweep_dir / old)) == ["pretrain"] and not (sweep_dir / new).exists()


def test_the_schema_says_which_settings_are_outside_the_identity() -> None:
    described = {r.path: r.description for r in schema.rows()}
    outside = [p for p, d in described.items() if d.endswith("(not part of a run's identity)")]
    assert "base.data.num_workers" in outside and "base.pretrain.keep_last" in outside
    assert "base.pretrain.seed" not in outside and "base.data.root" not in outside
