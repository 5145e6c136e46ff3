"""Lease records that cannot be trusted: heartbeats from the future (another host's clock) or not finite, and values
of the wrong type or out of range, count as expired with one warning that names the host or the file."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from extrema.run import lease


def holder_record(**changes: Any) -> dict[str, Any]:
    """A live-looking record of an attempt on another host, with `changes`."""
    return {**lease.my_record(1, None), "host": f"host-{uuid.uuid4().hex[:8]}", "pid": 4242, **changes}


def write_generation(stage: Path, text: str) -> Path:
    (stage / "lease").mkdir(parents=True)
    path = stage / "lease" / "00000001.json"
    path.write_text(text)
    return path


def test_a_live_record_from_another_host_keeps_the_stage(tmp_path: Path) -> None:
    stage = tmp_path / "s"
    write_generation(stage, json.dumps(holder_record(heartbeat_at=time.time() + 30)))  # within the skew bound
    assert isinstance(lease.try_acquire(str(stage)), lease.Holder)


def test_a_heartbeat_from_the_future_counts_as_expired_with_one_warning_naming_the_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXTREMA_LEASE_SKEW_S", "60")
    stage = tmp_path / "s"
    record = holder_record(heartbeat_at=time.time() + 3600)  # its host's clock is an hour ahead
    write_generation(stage, json.dumps(record))
    holder = lease.current(str(stage))
    assert holder is not None and "in the future" in (holder.why_free() or "")
    assert lease.live_holder(str(stage)) is None
    mine = lease.try_acquire(str(stage))
    assert isinstance(mine, lease.Lease) and mine.generation == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and record["host"] in err and "clock" in err and "00000001.json" in err, err


@pytest.mark.parametrize("beat", [float("nan"), float("inf")])
def test_a_heartbeat_that_is_not_finite_counts_as_expired_with_one_warning_naming_the_host(
    capsys: pytest.CaptureFixture[str], beat: float
) -> None:
    record = holder_record(heartbeat_at=beat)
    holder = lease.Holder(1, record, "s3://b/run/s/lease/00000001.json")
    assert "not a time" in (holder.why_free() or "") and "not a time" in (holder.why_free() or "")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and record["host"] in err, err


@pytest.mark.parametrize("beat", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_a_record_whose_heartbeat_is_not_finite_json_counts_as_expired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], beat: str
) -> None:
    stage = tmp_path / "s"
    record = holder_record(heartbeat_at=123.5)
    write_generation(stage, json.dumps(record).replace("123.5", beat))  # as Python's json writes nan and inf
    assert lease.live_holder(str(stage)) is None
    mine = lease.try_acquire(str(stage))
    assert isinstance(mine, lease.Lease) and mine.generation == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "counted as expired" in err and "00000001.json" in err, err


@pytest.mark.parametrize(
    "changes",
    [
        {"heartbeat_at": "2026-01-01T00:00:00"},
        {"heartbeat_at": True},
        {"heartbeat_at": None},
        {"pid": "4242"},
        {"pid": [4242]},
        {"pid": -1},
        {"pid": 1 << 40},
        {"pgid": 3.5},
        {"host": 7},
        {"released": "no"},
        {"token": None},
        {"attempt": 0},
        {"job_id": {"id": 1}},
    ],
    ids=lambda c: "-".join(f"{k}={v!r}" for k, v in c.items()),
)
def test_values_of_the_wrong_type_or_range_are_a_damaged_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], changes: dict[str, Any]
) -> None:
    stage = tmp_path / "s"
    path = write_generation(stage, json.dumps(holder_record(**changes)))
    holder = lease.current(str(stage))
    assert holder is not None and holder.damage is not None
    assert "damaged record" in (holder.why_free() or "")
    assert isinstance(holder.pid, int) and isinstance(holder.pgid, int) and holder.describe()
    assert not holder.running_here()
    mine = lease.try_acquire(str(stage))
    assert isinstance(mine, lease.Lease) and mine.generation == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and path.name in err and "damaged lease record" in err, err


def test_a_missing_field_is_a_damaged_record(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = holder_record()
    del record["heartbeat_at"]
    write_generation(tmp_path / "s", json.dumps(record))
    assert lease.live_holder(str(tmp_path / "s")) is None
    assert "no heartbeat_at" in capsys.readouterr().err
