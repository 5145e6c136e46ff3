"""Records of any shape: every record read from the run store is bounded in size and depth, its numbers finite and
its fields of the type and range the code reads; anything else is an unreadable record, listed with its path and
reason (never its content), and the read commands exit 3. The stage's own damaged record is set aside and
rewritten, never an endless failure."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from extrema import entry
from extrema.run import contract, rundir
from extrema.run.contract import Unreadable, update_status
from launch.addressed import DAMAGED
from launch.runstore import store
from launch.sweepfile.expand import load_runs
from tests.test_cli import TINY, cli

DEEP = b"[" * 100_000 + b"]" * 100_000
SECRET = "do-not-echo-4242x"


def finished(root: Path | str) -> str:
    """The tiny sweep as a finished sweep leaves it under `root` (a path or any fsspec URL), written directly (no
    stage runs); its URL."""
    sweep, runs = load_runs(TINY, root=str(root))
    url = store.sweep_url(sweep.root, sweep.name)
    listed = [{"run_id": r.run_id, "stages": list(r.stages), "overrides": r.overrides} for r in runs]
    store.write_manifest(url, {"sweep": "tiny", "launcher": sweep.launcher.model_dump(mode="json"), "runs": listed})
    for i, r in enumerate(runs):
        for s in r.stages:
            stage = store.stage_url(url, r.run_id, s)
            update_status(stage, state="completed", attempts=1, started_at=1e9, finished_at=1e9 + 60.5,
                          backend="local", job_id=f"local-1-{i}@elsewhere")  # fmt: skip
            rundir.write_json(f"{stage}/result.json", {"loss": 0.5 + i, "knn_top1": 10.0 * (i + 1)})
            rundir.write_json(f"{stage}/provenance.json", {"host": "h", "world_size": 1, "git_sha": "abc"})
    return url


def stage_dirs(url: str) -> list[Path]:
    return sorted(p.parent for p in Path(url).glob("*/*/status.json"))


def read_commands(url: str, tmp: Path) -> dict[str, tuple[int, str]]:
    """`status`, `results` and `report` of the sweep: exit code and everything printed."""
    out = {}
    for name, args in {
        "status": ("status", url),
        "results": ("results", url),
        "report": ("report", url, "--out", str(tmp / "report.html")),
    }.items():
        code, stdout, stderr = cli(*args)
        out[name] = (code, stdout + stderr)
    return out


def assert_listed(outputs: dict[str, tuple[int, str]], path: Path, reason: str) -> None:
    for name, (code, text) in outputs.items():
        flat = text.replace("\n", "")
        assert code == DAMAGED, (name, text)
        assert "Traceback" not in text and f"{path}: {reason}" in flat, (name, text)
        assert SECRET not in text, (name, text)


STATUS_DAMAGE: dict[str, tuple[bytes, str]] = {
    "nested 100,000 deep": (DEEP, "nested more than 100 levels deep"),
    "attempts a word": (b'{"state": "completed", "attempts": "three"}', "field attempts: Input should be a valid int"),
    "pid not a number": (json.dumps({"state": "failed", "pid": SECRET}).encode(), "field pid: Input should be"),
    "hosts not a list": (json.dumps({"state": "running", "hosts": SECRET}).encode(), "field hosts: Input should be"),
    "state unknown": (json.dumps({"state": SECRET}).encode(), "field state: Value error, not a stage state"),
    "a time past any clock": (b'{"state": "completed", "started_at": 1e300}', "field started_at: Input should be"),
    "not a finite number": (b'{"state": "completed", "finished_at": NaN}', "not JSON (NaN is not a number"),
    "a 40-digit integer": (b'{"attempts": 1' + b"0" * 40 + b"}", "not JSON (an integer out of range)"),
}


@pytest.mark.parametrize("kind", sorted(STATUS_DAMAGE))
def test_a_status_of_the_wrong_shape_is_listed_by_every_read_command(tmp_path: Path, kind: str) -> None:
    url = finished(tmp_path / "runs")
    bad = stage_dirs(url)[0] / "status.json"
    data, reason = STATUS_DAMAGE[kind]
    bad.write_bytes(data)
    outputs = read_commands(url, tmp_path)
    assert_listed(outputs, bad, reason)
    rows = [line for line in outputs["status"][1].splitlines() if line.startswith("│")]
    assert sum("completed" in row for row in rows) == 3  # every other row is shown
    assert bad.read_bytes() == data  # left for the user to see


@pytest.mark.parametrize("data", [DEEP, b'{"a":' * 50_000 + b"1" + b"}" * 50_000], ids=["lists", "objects"])
def test_a_deep_result_is_listed_and_its_row_kept(tmp_path: Path, data: bytes) -> None:
    url = finished(tmp_path / "runs")
    bad = stage_dirs(url)[1] / "result.json"
    bad.write_bytes(data)
    outputs = read_commands(url, tmp_path)
    assert_listed(outputs, bad, "nested more than 100 levels deep")
    code, out, _ = cli("results", url, "--format", "json")
    assert code == DAMAGED and len(json.loads(out)) == 4


def test_a_damaged_lease_is_listed_and_counts_as_expired(tmp_path: Path) -> None:
    url = finished(tmp_path / "runs")
    stage = stage_dirs(url)[0]
    update_status(str(stage), state="pending", job_id=None)  # not completed: its lease is looked at
    (stage / "lease").mkdir()
    bad = stage / "lease" / "00000001.json"
    bad.write_bytes(DEEP)
    code, out, err = cli("status", url)
    assert code == DAMAGED and "Traceback" not in out + err
    assert f"{bad}: nested more than 100 levels deep" in out.replace("\n", "")


def test_a_deep_manifest_is_refused_naming_it(tmp_path: Path) -> None:
    url = finished(tmp_path / "runs")
    manifest = Path(url) / "manifest.json"
    manifest.write_bytes(b'{"runs": ' + DEEP + b"}")
    code, out, err = cli("status", url)
    assert code == DAMAGED and f"{manifest}: nested more than 100 levels deep" in err.replace("\n", "")
    assert "Traceback" not in out + err


def test_a_run_list_with_unsafe_names_is_refused_without_echoing_them(tmp_path: Path) -> None:
    url = finished(tmp_path / "runs")
    manifest = Path(url) / "manifest.json"
    index = json.loads(manifest.read_text())
    part = Path(url) / store.PARTS / index["parts"][0]
    doc = json.loads(part.read_text())
    doc["runs"][0]["run_id"] = f"../{SECRET}"
    part.write_text(json.dumps(doc))
    code, out, err = cli("status", url)
    assert code == DAMAGED and f"{part}: field runs.0.run_id: Value error, not a safe name" in err.replace("\n", "")
    assert SECRET not in out + err


def test_a_named_pipe_is_not_a_record(tmp_path: Path) -> None:
    url = finished(tmp_path / "runs")
    bad = stage_dirs(url)[0] / "status.json"
    bad.unlink()
    os.mkfifo(bad)
    start = time.monotonic()
    code, out, _ = cli("status", url)
    assert code == DAMAGED and f"{bad}: not a regular file" in out.replace("\n", "")
    assert time.monotonic() - start < 10


def test_depth_is_bounded_before_parsing_and_strings_do_not_count() -> None:
    start = time.monotonic()
    with pytest.raises(Unreadable, match="nested more than 100 levels deep"):
        contract.parse_record("x/result.json", b'{"a": ' + DEEP + b"}")
    with pytest.raises(Unreadable, match="nested more than 100 levels deep"):
        contract.parse_record("x/result.json", b"[" * 100_000)
    assert time.monotonic() - start < 2
    brackets = "[{" * 5000 + '\\"]}'
    assert contract.parse_record("x/result.json", json.dumps({"text": brackets}).encode()) == {"text": brackets}
    nested: Any = 1
    for _ in range(contract.MAX_DEPTH - 1):
        nested = [nested]
    assert contract.parse_record("x/result.json", json.dumps({"a": nested}).encode())["a"] == nested
    with pytest.raises(Unreadable, match="nested more than"):
        contract.parse_record("x/result.json", json.dumps({"a": [nested]}).encode())


@pytest.mark.parametrize(
    "record",
    [
        {"state": "running", "attempts": True},
        {"submitted_by": {"host": "h", "pid": 0}},
        {"checkpoint_skips": [{"step": -1, "reason": "x"}]},
        {"checkpoint_skips": "none"},
        {"started_at": -5},
        {"error": ["a", "list"]},
        {"job_id": 7},
    ],
)
def test_status_fields_are_typed_and_ranged(record: dict[str, Any]) -> None:
    with pytest.raises(Unreadable, match=r"^x/status\.json: field "):
        contract.parse_record("x/status.json", json.dumps(record).encode())


def test_free_fields_are_kept_as_they_are() -> None:
    record = {"state": "completed", "attempts": 2, "someone_elses": {"deep": [1, "x", None]}, "started_at": 5}
    assert contract.parse_record("x/status.json", json.dumps(record).encode()) == record
    result = {"knn_top1": 51.5, "per_class": [1, 2], "note": "free"}
    assert contract.parse_record("x/result.json", json.dumps(result).encode()) == result


def test_the_stage_sets_its_damaged_record_aside_and_rewrites_it(tmp_path: Path) -> None:
    stage = tmp_path / "run" / "pretrain"
    stage.mkdir(parents=True)
    (stage / "status.json").write_text('{"state": "completed", "attempts": "three"}')
    with pytest.raises(Unreadable):
        contract.read_status(str(stage))
    assert entry.completed_result(str(stage)) is None  # not completed as far as anyone can tell: it runs
    new = update_status(str(stage), state="running", attempts=1)
    assert new["state"] == "running" and "field attempts" in new["replaced_damaged"]
    assert contract.read_status(str(stage))["attempts"] == 1
    (aside,) = stage.glob("status.json.damaged-*")
    assert aside.read_text() == '{"state": "completed", "attempts": "three"}'
    (stage / "status.json").write_bytes(DEEP)
    assert update_status(str(stage), state="failed")["state"] == "failed"
    assert len(list(stage.glob("status.json.damaged-*"))) == 2


def test_a_log_keeps_its_good_lines_and_drops_the_rest(tmp_path: Path) -> None:
    log = tmp_path / "metrics.jsonl"
    lines = [b'{"step": 1, "loss": 0.5}', DEEP, b'{"step": 2, "loss": NaN}', b"[1, 2]", b'{"step": 3, "loss": 0.25}']
    log.write_bytes(b"\n".join(lines) + b'\n{"step": 4, "lo')
    assert contract.read_lines(str(log)) == [{"step": 1, "loss": 0.5}, {"step": 3, "loss": 0.25}]
    assert contract.read_lines(str(log), limit=45, tail=True) == [{"step": 3, "loss": 0.25}]
    assert contract.read_lines(str(tmp_path / "absent.jsonl")) == []
