"""Scripting gaps: `status --json`, `--version`, run id prefixes for --run, a root never swept, a root's sweeps."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from extrema.run import rundir
from extrema.run.contract import update_status
from launch.cli import main
from launch.cli.arguments import run_named
from launch.inputs.errors import UsageError
from launch.runstore import store
from launch.sweepfile.expand import load_runs

TINY = Path(__file__).resolve().parent.parent / "jobs" / "tiny.yaml"


def cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def swept(root: Path) -> tuple[str, list[str]]:
    """The tiny sweep's manifest written under `root` (as a submission writes it), one stage completed."""
    sweep, runs = load_runs(TINY, root=str(root))
    url = store.sweep_url(sweep.root, sweep.name)
    launcher = sweep.launcher.model_dump(mode="json")
    store.write_manifest(
        url, store.sweep_manifest(sweep.name, str(root), str(TINY), launcher, "", [r.stored() for r in runs])
    )
    update_status(store.stage_url(url, runs[0].run_id, "pretrain"), state="completed")
    return url, [r.run_id for r in runs]


def test_version() -> None:
    code, out, _ = cli("--version")
    assert code == 0 and out.startswith("extrema-launch ") and len(out.split()) == 2


def test_status_json_is_the_table_as_records(tmp_path: Path) -> None:
    url, ids = swept(tmp_path / "runs")
    code, out, _ = cli("status", url, "--json")
    records = json.loads(out)
    assert code == 0 and [(r["run"], r["stage"]) for r in records] == [
        (ids[0], "pretrain"),
        (ids[0], "knn"),
        (ids[1], "pretrain"),
        (ids[1], "knn"),
    ]
    assert list(records[0])[:4] == ["run", "stage", "model.cls_token", "state"]
    assert [r["state"] for r in records] == ["completed", "-", "-", "-"] and records[0]["model.cls_token"] == "cait"
    code, _, err = cli("status", url, "--json", "--watch")
    assert code == 2 and "leave out --watch" in err


def test_status_of_a_sweep_never_swept_says_so(tmp_path: Path) -> None:
    code, out, err = cli("status", str(TINY), "--root", str(tmp_path / "runs"))
    assert code == 2 and out == ""
    assert f"never swept to {tmp_path / 'runs' / 'tiny'} (no manifest.json there)" in err
    code, _, err = cli("status", str(tmp_path))
    assert code == 2 and "no manifest.json there" in err


def test_status_of_a_root_lists_its_sweeps(tmp_path: Path) -> None:
    swept(tmp_path / "runs")
    code, out, _ = cli("status", str(tmp_path / "runs"))
    assert code == 0 and "1 sweep(s) in" in out
    assert any(
        line.split("│")[1:5] == [" tiny  ", " 2    ", " 4    ", " 3 not submitted, 1 completed "]
        for line in out.splitlines()
    ), out
    code, out, _ = cli("status", str(tmp_path / "runs"), "--json")
    (record,) = json.loads(out)
    assert code == 0 and record["sweep"] == "tiny" and (record["runs"], record["jobs"]) == (2, 4)
    assert record["states"] == {"completed": 1, "not submitted": 3} and record["source"] == str(TINY)


def test_run_takes_a_unique_prefix(tmp_path: Path) -> None:
    url, ids = swept(tmp_path / "runs")
    code, _, err = cli("logs", url, "--run", "zz", "--stage", "knn")
    assert code == 2 and "run 'zz' is not part of" in err and "(no run id starts with it)" in err
    code, _, err = cli("logs", url, "--run", "", "--stage", "knn")
    assert code == 2 and "is not part of" in err
    common = next((n for n in range(10, 0, -1) if ids[0][:n] == ids[1][:n]), 0)
    code, _, err = cli("logs", url, "--run", ids[0][: common + 1], "--stage", "knn")
    assert "is not part of" not in err and "ambiguous" not in err
    code, _, err = cli("cancel", url, "--run", ids[1][: common + 1])
    assert code == 0, err
    runs = [store.StoredRun(i, ("pretrain",), {}) for i in ("abc123", "abd456", "abc789")]
    assert run_named(runs, "abd", url).run_id == "abd456" and run_named(runs, "abc789", url).run_id == "abc789"
    with pytest.raises(UsageError, match=r"run 'abc' is ambiguous in .*: abc123, abc789 start with it"):
        run_named(runs, "abc", url)


def test_results_of_several_sweeps_are_one_table_with_a_sweep_column(tmp_path: Path) -> None:
    first, ids = swept(tmp_path / "a")
    second, _ = swept(tmp_path / "b")
    rundir.write_json(rundir.join(store.stage_url(first, ids[0], "pretrain"), "result.json"), {"loss_final": 1.0})
    rundir.write_json(rundir.join(store.stage_url(second, ids[0], "pretrain"), "result.json"), {"loss_final": 3.0})
    code, out, _ = cli("results", first, second, "--format", "json")
    rows = json.loads(out)
    assert code == 0 and len(rows) == 8 and list(rows[0])[:3] == ["run_id", "stage", "sweep"], out[:2000]
    assert [r["sweep"] for r in rows] == [first] * 4 + [second] * 4
    done = {(r["sweep"], r["loss_final"]) for r in rows if r["state"] == "completed"}
    assert done == {(first, 1.0), (second, 3.0)}

    code, out, err = cli("results", first, second, "--group-by", "sweep", "model.cls_token", "--format", "json")
    groups = {(g["stage"], g["sweep"], g["model.cls_token"]): g for g in json.loads(out or "[]")}
    cait = [
        (s, g["loss_final.mean"], g["runs"])
        for (stage, s, c), g in groups.items()
        if stage == "pretrain" and c == "cait"
    ]
    assert code == 0 and sorted(cait) == [(first, 1.0, 1), (second, 3.0, 1)], out[:2000] + err

    code, out, _ = cli("results", first, "--format", "json")  # one sweep: the table as before, no sweep column
    assert code == 0 and "sweep" not in json.loads(out)[0]
    code, _, err = cli("results", first, first)
    assert code == 2 and f"the same sweep given twice: {first}" in err
