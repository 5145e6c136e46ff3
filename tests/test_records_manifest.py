"""Records sized by what they hold: the manifest is an index plus parts of at most PART_BYTES, so a sweep of any
size the spec allows reads back; a manifest written before parts (every run inline) keeps reading and is never set
aside for its size alone."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from extrema.run import contract, rundir
from launch.runstore import store
from tests.test_cli import cli


def sweep_of(n: int) -> dict[str, Any]:
    """A manifest of `n` runs of two stages, each with a job record, as a real submission writes it."""
    runs = [
        {"run_id": f"{i:010x}", "stages": ["pretrain", "knn"],
         "overrides": {"model.cls_token": ["cait", "vit", "avgpool"][i % 3], "pretrain.seed": i,
                       "pretrain.masking": {"ratio": 0.75, "num_masks": 1 + i % 4}}}
        for i in range(n)
    ]  # fmt: skip
    jobs = {
        f"{r['run_id']}/{s}": {"job_id": f"8812345_{i}", "backend": "slurm", "submitted_at": 1.7e9}
        for i, r in enumerate(runs)
        for s in r["stages"]
    }
    return {"sweep": "big", "backend": "slurm", "launcher": {"backend": "slurm"}, "runs": runs, "jobs": jobs}


def test_ten_thousand_runs_read_back_from_parts_none_larger_than_a_record(tmp_path: Path) -> None:
    url = str(tmp_path / "big")
    manifest = sweep_of(10_000)
    start = time.monotonic()
    written = store.write_manifest(url, manifest)
    back = store.read_manifest(url)
    took = time.monotonic() - start
    assert back == written and back is not None
    assert back["runs"] == manifest["runs"] and back["jobs"] == manifest["jobs"]
    assert [r.run_id for r in store.stored_runs(back)] == [f"{i:010x}" for i in range(10_000)]
    parts = sorted((tmp_path / "big" / store.PARTS).iterdir())
    assert len(parts) >= 10 and all(p.stat().st_size <= store.PART_BYTES for p in parts)
    assert (tmp_path / "big" / store.MANIFEST).stat().st_size < 4096
    assert took < 8, took


def test_a_manifest_written_before_parts_keeps_reading_and_becomes_parts(tmp_path: Path) -> None:
    url = str(tmp_path / "big")
    old = sweep_of(10_000)
    rundir.write_json(f"{url}/manifest.json", old)  # 4.6 MB, as the launcher wrote it before parts
    assert (tmp_path / "big" / "manifest.json").stat().st_size > contract.MAX_RECORD_BYTES
    back = store.read_manifest(url)
    assert back is not None and back["runs"] == old["runs"] and back["jobs"] == old["jobs"]
    more = {"sweep": "big", "runs": old["runs"][:1], "jobs": {"0000000000/knn": {"job_id": "9", "backend": "slurm"}}}
    merged = store.write_manifest(url, more)
    assert not list((tmp_path / "big").glob("manifest.json.damaged-*"))  # nothing set aside: its job records kept
    assert merged["jobs"]["0000000001/knn"] == old["jobs"]["0000000001/knn"]
    assert merged["jobs"]["0000000000/knn"]["job_id"] == "9" and len(merged["runs"]) == 10_000
    assert store.read_manifest(url) == merged
    assert "parts" in json.loads((tmp_path / "big" / "manifest.json").read_text())


def test_a_manifest_refused_for_its_size_alone_is_left_where_it_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = str(tmp_path / "s")
    rundir.write_json(f"{url}/manifest.json", sweep_of(50))
    monkeypatch.setattr(store, "MAX_MANIFEST_BYTES", 1000)
    with pytest.raises(contract.Unreadable, match="bytes a record may hold") as e:
        store.write_manifest(url, sweep_of(1))
    assert e.value.oversize and not list((tmp_path / "s").glob("manifest.json.damaged-*"))


def test_a_damaged_or_missing_part_is_named_and_set_aside_by_the_next_submission(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    store.write_manifest(url, sweep_of(3))
    (part,) = (tmp_path / "s" / store.PARTS).iterdir()
    part.write_text('{"runs": [')
    with pytest.raises(contract.Unreadable, match=f"^{part}: not JSON"):
        store.read_manifest(url)
    code, out, err = cli("status", url)
    assert code == 3 and f"{part}: not JSON" in err.replace("\n", "") and "Traceback" not in out + err
    store.write_manifest(url, sweep_of(2))
    assert len(list((tmp_path / "s" / store.PARTS).glob("*.damaged-*"))) == 1
    back = store.read_manifest(url)
    assert back is not None and len(back["runs"]) == 2
    part = next((tmp_path / "s" / store.PARTS).glob("runs-*.json"))
    part.unlink()
    with pytest.raises(contract.Unreadable, match=r"missing, though manifest\.json lists it"):
        store.read_manifest(url)


def test_parts_no_index_lists_are_removed_once_old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "s")
    store.write_manifest(url, sweep_of(3))
    (first,) = (tmp_path / "s" / store.PARTS).iterdir()
    store.write_manifest(url, {"jobs": {"0000000000/knn": {"job_id": "new"}}})
    assert first.exists() and len(list((tmp_path / "s" / store.PARTS).iterdir())) == 2  # young: a concurrent
    os.utime(first, (time.time() - store.PART_GRACE_S - 60,) * 2)  # sweep's index may still name it
    store.write_manifest(url, {"jobs": {"0000000000/knn": {"job_id": "newer"}}})
    assert not first.exists() and len(list((tmp_path / "s" / store.PARTS).iterdir())) == 2
    back = store.read_manifest(url)
    assert back is not None and back["jobs"]["0000000000/knn"]["job_id"] == "newer" and len(back["runs"]) == 3


def test_a_part_holding_one_large_run_stays_readable(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    manifest = sweep_of(4)
    manifest["runs"][1]["overrides"]["data.extra"] = ["x" * 100] * 8000  # 0.8 MB of swept values in one run
    store.write_manifest(url, manifest)
    back = store.read_manifest(url)
    assert back is not None and back["runs"] == manifest["runs"]
    assert len(list((tmp_path / "s" / store.PARTS).iterdir())) >= 2
