"""Every JSON the project writes is standard JSON: no NaN or Infinity tokens (a non-finite number is null, with
`<key>.nonfinite` saying what it was), in result.json, status.json, metrics.jsonl, `results --format json` and the
sweep's `--json-events`; parquet keeps floats as floats."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from extrema.run import metrics_log, rundir
from tests.cluster_sweeps import TINY, cli


def strict(text: str) -> Any:
    """Parse as standard JSON: NaN, Infinity and -Infinity tokens are errors."""

    def refuse(token: str) -> None:
        raise ValueError(f"not standard JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def test_records_and_logs_hold_only_standard_json(tmp_path: Path) -> None:
    rundir.write_json(str(tmp_path / "result.json"), {"loss_final": math.nan, "knn": {"top1": math.inf}, "ok": 1.5})
    doc = strict((tmp_path / "result.json").read_text())
    assert doc == {"loss_final": None, "loss_final.nonfinite": "nan", "knn": {"top1": None, "top1.nonfinite": "inf"},
                   "ok": 1.5}  # fmt: skip
    log = metrics_log.MetricsLog(str(tmp_path / "metrics.jsonl"))
    log.log({"step": 1, "loss": -math.inf, "big": 2**70}, flush=True)
    [line] = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert strict(line) == {"step": 1, "loss": None, "loss.nonfinite": "-inf", "big": 2**70}


def test_results_json_and_events_parse_strictly_and_parquet_keeps_floats(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    code, out = cli("sweep", str(TINY), "--root", str(root), "--json-events")
    assert code == 0, out
    for line in out.splitlines():
        if line.startswith("{"):
            strict(line)
    [result] = sorted(root.glob("tiny/*/pretrain/result.json"))[:1]
    doc = strict(result.read_text())
    doc.update(loss_final=math.nan, huge=2**62)  # past 2**53: exact as a JSON number (records hold 64 bits)
    rundir.write_json(str(result), doc)
    code, out = cli("results", str(TINY), "--root", str(root), "--format", "json", "--out", str(tmp_path / "r.json"))
    assert code == 0, out
    rows = strict((tmp_path / "r.json").read_text())
    [row] = [r for r in rows if r["stage"] == "pretrain" and r.get("loss_final.nonfinite")]
    assert row["loss_final"] is None and row["loss_final.nonfinite"] == "nan"
    assert row["huge"] == 2**62 and isinstance(row["huge"], int)
    code, out = cli("results", str(TINY), "--root", str(root), "--out", str(tmp_path / "r.parquet"))
    assert code == 0, out
    table = pq.read_table(tmp_path / "r.parquet")
    assert str(table.schema.field("loss_final").type) == "double"
