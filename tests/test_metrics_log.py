"""metrics.jsonl on a filesystem grows by appends (a record costs one line's write at any length), a resumed stage
drops the records past its checkpoint, and a partial last line left by a killed writer never swallows the next."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from extrema.run import metrics_log, rundir


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_records_are_appended_without_rewriting_the_log(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 1001)))
    inode = os.stat(path).st_ino
    log = metrics_log.MetricsLog(str(path), keep_after_step=1000)
    log.log({"step": 1001, "loss": 0.5}, flush=True)
    log.log({"step": 1002, "loss": 0.4}, flush=True)
    assert os.stat(path).st_ino == inode  # the same file, appended to (a rewrite replaces it)
    assert [r["step"] for r in lines(path)] == list(range(1, 1003))


def test_a_resume_drops_later_records_and_mends_a_partial_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    whole = "".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 11))
    path.write_text(whole + '{"step": 11, "lo')  # a writer killed mid-line
    log = metrics_log.MetricsLog(str(path), keep_after_step=10)
    log.log({"step": 11, "loss": 0.5}, flush=True)
    assert [r["step"] for r in lines(path)] == list(range(1, 12))
    log = metrics_log.MetricsLog(str(path), keep_after_step=6)  # resumed from the step-6 checkpoint
    log.log({"step": 7, "loss": 0.3}, flush=True)
    assert [r["step"] for r in lines(path)] == [1, 2, 3, 4, 5, 6, 7]


def test_an_object_store_log_is_written_in_parts_each_flush_rewriting_only_the_last(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "memory://metrics-log-parts/pretrain/metrics.jsonl"
    monkeypatch.setattr(metrics_log, "PART_BYTES", 200)
    longest = len(rundir.dumps({"loss": 0.123456789, "step": 40}, sort_keys=True)) + 1
    log = metrics_log.MetricsLog(url)
    fs, _ = rundir.filesystem(url)
    writes: list[str] = []
    real_pipe = fs.pipe_file
    monkeypatch.setattr(fs, "pipe_file", lambda path, value, **kw: (writes.append(path), real_pipe(path, value, **kw)))
    for step in range(1, 41):
        log.log({"loss": 0.123456789, "step": step}, flush=True)
    parts = metrics_log.part_urls(url)
    sizes = [len(fs.cat_file(rundir.filesystem(p)[1])) for p in parts]
    assert len(parts) > 5 and not rundir.exists(url)  # no whole-log object
    assert all(size <= 200 for size in sizes) and all(size > 200 - longest for size in sizes[:-1])  # full parts
    assert len(writes) <= 40 + len(parts)  # one part per flush (and one more when a part fills)
    assert [r["step"] for r in metrics_log.read_records(url)] == list(range(1, 41))
    assert metrics_log.read_tail(url, 1 << 10)[-1]["step"] == 40
    resumed = metrics_log.MetricsLog(url, keep_after_step=13)  # a resume from step 13 cuts inside an early part
    assert [r["step"] for r in resumed.records] == list(range(1, 14))
    resumed.log({"loss": 0.5, "step": 14}, flush=True)
    assert [r["step"] for r in metrics_log.read_records(url)] == list(range(1, 15))
    assert len(metrics_log.part_urls(url)) < len(parts)  # the parts past the cut are gone


def test_an_object_store_log_written_whole_by_an_older_version_is_taken_over() -> None:
    url = "memory://metrics-log-legacy/pretrain/metrics.jsonl"
    rundir.write_text_atomic(url, "".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 6)))
    log = metrics_log.MetricsLog(url, keep_after_step=5)
    log.log({"step": 6, "loss": 0.5}, flush=True)
    assert [r["step"] for r in metrics_log.read_records(url)] == [1, 2, 3, 4, 5, 6]
    assert not rundir.exists(url) and len(metrics_log.part_urls(url)) == 1


def test_reading_a_log_is_bounded_whatever_its_length(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in range(1, 10001)))
    some = metrics_log.read_records(str(path), limit=1000)
    assert 0 < len(some) < 100 and [r["step"] for r in some] == list(range(1, len(some) + 1))
    assert metrics_log.read_tail(str(path), 1000)[-1]["step"] == 10000


def test_progress_and_plots_read_a_log_in_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    from launch import progress
    from launch.runstore import store
    from launch.views import plots

    monkeypatch.setattr(metrics_log, "PART_BYTES", 300)
    sweep = "memory://metrics-log-readers/sweep"
    log = metrics_log.MetricsLog(store.stage_url(sweep, "r1", "pretrain") + "/metrics.jsonl")
    for step in range(1, 31):
        log.log({"step": step, "total_steps": 30, "loss": 1.0 / step, "epoch": step / 10}, flush=True)
    assert len(metrics_log.part_urls(log.url)) > 3
    assert progress.latest_progress(store.stage_url(sweep, "r1", "pretrain"))["step"] == 30
    runs = [store.StoredRun("r1", ("pretrain",), {})]
    assert [r["step"] for r in plots.read_metrics(sweep, runs)["r1"]] == list(range(1, 31))
