"""metrics.jsonl on a filesystem grows by appends (a record costs one line's write at any length), a resumed stage
drops the records past its checkpoint, and a partial last line left by a killed writer never swallows the next."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def test_an_object_store_log_is_rewritten_whole(tmp_path: Path) -> None:
    url = "memory://metrics-log-test/metrics.jsonl"
    log = metrics_log.MetricsLog(url)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step}, flush=True)
    assert [r["step"] for r in rundir.read_jsonl(url)] == [1, 2, 3]
    assert [r["step"] for r in metrics_log.MetricsLog(url, keep_after_step=2).records] == [1, 2]
