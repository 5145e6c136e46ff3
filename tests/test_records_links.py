"""Nothing read from the store leads outside it: a record, a picture or a log that is a symbolic link to a file
outside the sweep's directory is never read, inlined or printed; it is listed as unreadable with its path."""

from __future__ import annotations

import base64
import json
import os
import shutil
from pathlib import Path

from extrema.run import contract, rundir
from launch.progress import latest_progress
from launch.runstore import store
from tests.test_cli import cli
from tests.test_records_shape import finished

SECRET = "-----BEGIN PRIVATE KEY----- MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"
PNG = b"\x89PNG\r\n\x1a\n"


def outside_file(tmp: Path, name: str, data: bytes) -> Path:
    """A private file outside the run store."""
    private = tmp / "home" / ".ssh"
    private.mkdir(parents=True, exist_ok=True)
    path = private / name
    path.write_bytes(data)
    return path


def link(at: Path, to: Path) -> Path:
    if at.exists() or at.is_symlink():
        at.unlink()
    at.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(to, at)
    return at


def test_a_linked_result_is_not_shown(tmp_path: Path) -> None:
    url = finished(tmp_path / "runs")
    secret = outside_file(tmp_path, "key.json", json.dumps({"knn_top1": 1.0, "key": SECRET}).encode())
    bad = link(sorted(Path(url).glob("*/knn/result.json"))[0], secret)
    for args in (("results", url), ("results", url, "--format", "json"), ("status", url)):
        code, out, err = cli(*args)
        assert code == 3 and SECRET not in out + err and "Traceback" not in out + err, (args, out + err)
        assert f"{bad}: leads outside the run store; refused" in (out + err).replace("\n", ""), (args, out + err)


def test_a_linked_picture_is_not_inlined_in_the_report(tmp_path: Path) -> None:
    url = finished(tmp_path / "runs")
    run = sorted(p for p in Path(url).iterdir() if (p / "pretrain").is_dir())[0]
    secret = outside_file(tmp_path, "id_rsa", PNG + SECRET.encode())
    bad = link(run / "viz" / "attention.png", secret)
    (run / "pretrain" / "viz").mkdir()
    (run / "pretrain" / "viz" / "fine.png").write_bytes(PNG + b"a picture of the store")
    (run / "pretrain" / "viz" / "text.png").write_text("not a picture")
    page = tmp_path / "report.html"
    code, out, err = cli("report", url, "--out", str(page))
    text = page.read_text()
    assert code == 3 and "Traceback" not in out + err, out + err
    assert SECRET not in text and base64.b64encode(PNG + SECRET.encode()).decode()[:40] not in text
    assert base64.b64encode(PNG + b"a picture of the store").decode() in text  # a picture of the store is shown
    for shown in (text, out.replace("\n", "")):
        assert f"{bad}: leads outside the run store; refused" in shown
        assert f"{run}/pretrain/viz/text.png: not a PNG image" in shown


def test_a_linked_log_is_not_printed(tmp_path: Path) -> None:
    url = finished(tmp_path / "runs")
    secret = outside_file(tmp_path, "key.txt", SECRET.encode() + b"\n")
    stage = sorted(Path(url).glob("*/pretrain"))[0]
    bad = link(stage / "logs" / "local.log", secret)
    (stage / "logs" / "other.log").write_text("a line of the stage\n")
    code, out, err = cli("logs", url, "--run", stage.parent.name, "--stage", "pretrain")
    assert code == 0 and SECRET not in out + err and "Traceback" not in out + err, out + err
    assert "a line of the stage" in out
    problems: list[str] = []
    assert store.log_files(str(stage), problems) == [str(stage / "logs" / "other.log")]
    assert problems == [f"{bad}: leads outside the run store; refused"]
    shutil.rmtree(stage / "logs")
    link(stage / "logs", secret.parent)  # the whole folder, linked out
    assert store.log_files(str(stage)) == []


def test_a_linked_directory_on_the_way_is_followed_only_inside_the_store(tmp_path: Path) -> None:
    url = finished(tmp_path / "runs")
    stage = sorted(Path(url).glob("*/pretrain"))[0]
    inside = Path(url) / "kept"
    inside.mkdir()
    rundir.write_json(str(inside / "result.json"), {"kept": 1})
    link(stage / "result.json", inside / "result.json")  # a link within the store is a file of the store
    assert store.read_many(url, [str(stage / "result.json")]) == [{"kept": 1}]
    secret = outside_file(tmp_path, "metrics.jsonl", b'{"step": 1, "total_steps": 9, "loss": 0.25}\n')
    link(stage / "metrics.jsonl", secret)
    assert latest_progress(str(stage), store.real_tree(url)) == {}
    assert latest_progress(str(stage))["loss"] == 0.25  # no tree given: the stage's own driver reads its log
    (stage / "metrics.jsonl").unlink()
    assert contract.read_bytes(str(stage / "metrics.jsonl"), inside=store.real_tree(url)) is None
