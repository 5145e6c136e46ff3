"""The run store on memory:// and file://: manifest, spec and status files, path safety, the results table."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extrema.run import rundir
from extrema.run.contract import update_status
from extrema.spec import RunSpec
from launch.runstore import results, store
from launch.sweepfile.expand import load_runs

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["memory", "file"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "memory":
        return f"memory://store-{uuid.uuid4().hex[:8]}"
    return f"file://{tmp_path}/runs"


def tiny_specs() -> list[tuple[str, RunSpec]]:
    _, runs = load_runs(REPO / "jobs" / "tiny.yaml")
    return [(r.run_id, r.spec("tiny", s)) for r in runs for s in r.stages]


def test_spec_status_and_manifest_round_trip(root: str) -> None:
    url = store.sweep_url(root, "tiny")
    assert url == f"{root}/tiny"
    run_id, spec = tiny_specs()[0]
    stage = store.stage_url(url, spec.run_id, spec.stage)
    store.write_spec(stage, spec)
    assert stage == f"{root}/tiny/{run_id}/pretrain"
    assert RunSpec.model_validate(rundir.read_json(f"{stage}/spec.json")) == spec

    assert store.read_status(stage) == {}
    store.mark_submitted(stage, "local", "local-1-0@h", submitted_at=100.0, code="c0de")
    assert store.read_status(stage) == {
        "state": "pending",
        "backend": "local",
        "job_id": "local-1-0@h",
        "submitted_at": 100.0,
        "submitted_by": store.submitter(),
        "submitted_code": "c0de",
        "error": None,
        "finished_at": None,
    }
    update_status(stage, state="completed", attempts=1)
    assert store.mark_ended(stage, "cancelled", "too late") is None
    assert store.read_status(stage)["state"] == "completed"
    assert store.read_statuses(url, [f"{run_id}/pretrain", f"{run_id}/knn"])[f"{run_id}/knn"] == {}

    store.write_manifest(
        url,
        {
            "sweep": "tiny",
            "runs": [{"run_id": "b", "stages": ["pretrain"], "overrides": {}}],
            "jobs": {"b/pretrain": {"job_id": "1"}},
            "created_at": 1.0,
        },
    )
    merged = store.write_manifest(
        url,
        {
            "sweep": "tiny",
            "runs": [{"run_id": "a", "stages": ["knn"], "overrides": {"x": 1}}],
            "jobs": {"a/knn": {"job_id": "2"}},
            "created_at": 2.0,
        },
    )
    assert merged == store.read_manifest(url)
    assert [e.run_id for e in store.stored_runs(merged)] == ["b", "a"]
    assert set(merged["jobs"]) == {"b/pretrain", "a/knn"} and merged["created_at"] == 1.0


def test_log_files_are_listed_as_urls(root: str) -> None:
    stage = store.stage_url(store.sweep_url(root, "s"), "abc", "pretrain")
    assert store.log_files(stage) == []
    rundir.write_text_atomic(f"{stage}/logs/local.log", "hello\n")
    (found,) = store.log_files(stage)
    fs, path = rundir.filesystem(found)
    assert found.endswith("/abc/pretrain/logs/local.log") and fs.cat(path) == b"hello\n"


@pytest.mark.parametrize(
    "name",
    ["../escape", "..", ".", "a/b", "/etc", "a\nb", "a;b", "$(touch x)", "`id`", "a b", "", "ä", "a\\b", "x" * 101],
)
def test_unsafe_names_never_become_paths(name: str) -> None:
    with pytest.raises(ValueError, match="is not allowed"):
        store.safe_name(name)
    with pytest.raises(ValueError):
        store.stage_url("memory://r/s", name, "pretrain")
    with pytest.raises(ValueError):
        store.sweep_url("memory://r", name)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30), st.text(max_size=12))
def test_every_accepted_name_stays_one_component_under_the_root(run_id: str, stage: str) -> None:
    try:
        url = store.stage_url("memory://root/sweep", run_id, stage)
    except ValueError:
        return
    rest = url.removeprefix("memory://root/sweep/")
    assert rest == f"{run_id}/{stage}" and rest.count("/") == 1
    assert ".." not in rest and "\n" not in rest and not rest.startswith("/")


def test_roots_are_made_absolute_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert store.normalize_root("./runs/") == str(tmp_path / "runs")
    assert store.normalize_root("memory://bucket/x/") == "memory://bucket/x"
    assert store.normalize_root("file:///tmp/x/") == "file:///tmp/x"
    with pytest.raises(ValueError):
        store.normalize_root("runs\n#x")
    for root, reason in [
        ("file://", "has no path"),
        ("file://runs", "has a relative path"),
        ("file:///", "names the filesystem root"),
        ("/", "is the filesystem root"),
        ("nosuchproto://x", "fsspec knows no protocol 'nosuchproto'"),
    ]:
        with pytest.raises(ValueError, match=reason):
            store.normalize_root(root)


def fill(url: str) -> list[store.StoredRun]:
    """A sweep as stages leave it: two completed pretrain stages, one failed knn, one never started."""
    entries = [
        store.StoredRun("r1", ("pretrain", "knn"), {"model.cls_token": "cait", "pretrain.masking": {"ratio": 0.75}}),
        store.StoredRun("r2", ("pretrain", "knn"), {"model.cls_token": "vit", "pretrain.masking": {"ratio": 0.5}}),
    ]
    for i, run in enumerate(("r1", "r2")):
        stage = store.stage_url(url, run, "pretrain")
        update_status(
            stage, state="completed", attempts=1, started_at=1000.0 + i, finished_at=1010.5 + i, job_id=f"j{i}"
        )
        rundir.write_json(f"{stage}/result.json", {"loss_final": 0.5 + i, "steps": 4, "knn": {"top1": 60.0 + i}})
        rundir.write_json(
            f"{stage}/provenance.json", {"git_sha": "abc", "git_dirty": False, "world_size": 1, "host": "h"}
        )
    update_status(store.stage_url(url, "r1", "knn"), state="failed", attempts=2, error="boom")
    return entries


def test_results_table_has_typed_columns(root: str) -> None:
    url = store.sweep_url(root, "res")
    table = results.collect(url, fill(url))
    assert table.num_rows == 4
    assert table.column_names[:5] == ["run_id", "stage", "state", "model.cls_token", "pretrain.masking.ratio"]
    schema = table.schema
    assert schema.field("pretrain.masking.ratio").type == pa.float64()
    assert schema.field("loss_final").type == pa.float64() and schema.field("steps").type == pa.int64()
    assert schema.field("knn.top1").type == pa.float64()
    assert schema.field("attempts").type == pa.int64() and schema.field("git_dirty").type == pa.bool_()
    assert schema.field("started_at").type == pa.timestamp("ms", tz="UTC")
    rows = table.to_pylist()
    assert [(r["run_id"], r["stage"], r["state"]) for r in rows] == [
        ("r1", "pretrain", "completed"),
        ("r1", "knn", "failed"),
        ("r2", "pretrain", "completed"),
        ("r2", "knn", None),
    ]
    assert rows[0]["elapsed_s"] == pytest.approx(10.5) and rows[1]["error"] == "boom"
    assert rows[0]["started_at"].timestamp() == pytest.approx(1000.0)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json"])
def test_results_written_and_read_back(root: str, fmt: results.Format) -> None:
    url = store.sweep_url(root, "res")
    table = results.collect(url, fill(url))
    out = f"{root}/exports/results.{fmt}"
    results.write(table, out, fmt)
    with fsspec.open(out, "rb") as f:
        data = f.read()
    if fmt == "parquet":
        back = pq.read_table(io.BytesIO(data))
        assert back.schema.equals(table.schema) and back.to_pylist() == table.to_pylist()
    elif fmt == "csv":
        back = pacsv.read_csv(io.BytesIO(data))
        assert back.column("loss_final").to_pylist() == [0.5, None, 1.5, None]
        assert pa.types.is_timestamp(back.schema.field("finished_at").type)
    else:
        back_rows = json.loads(data)
        assert back_rows[0]["knn.top1"] == 60.0 and back_rows[0]["started_at"].startswith("1970-01-01T00:16:40")


def test_mixed_types_fall_back_to_json_text() -> None:
    table = results.to_table([{"run_id": "a", "x": 1}, {"run_id": "b", "x": "one"}, {"run_id": "c", "x": [1, 2]}])
    assert table.schema.field("x").type == pa.string()
    assert table.column("x").to_pylist() == ["1", '"one"', "[1, 2]"]
    assert results.to_table([]).num_rows == 0


def test_read_many_keeps_order_and_gives_none_for_missing_files(root: str) -> None:
    urls = [f"{root}/many/{i}.json" for i in range(6)]
    for i in (0, 2, 3, 5):
        rundir.write_json(urls[i], {"i": i})
    assert store.read_many(f"{root}/many", urls) == [{"i": 0}, None, {"i": 2}, {"i": 3}, None, {"i": 5}]
    assert store.read_many(f"{root}/many", []) == []
