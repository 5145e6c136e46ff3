"""One bad file never hides the rest: every readable row is shown, each unreadable record is listed with its path
and reason, the documented exit code (3) is returned, and nothing is followed outside the run store."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from launch.addressed import DAMAGED
from launch.runstore import store
from tests.test_cli import TINY, cli


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A completed tiny sweep (2 runs x pretrain, knn), copied by each test before it damages it."""
    root = tmp_path_factory.mktemp("done") / "runs"
    code, out, err = cli("sweep", str(TINY), "--root", str(root))
    assert code == 0, out + err
    return root


def stages(root: Path) -> list[Path]:
    return sorted((root / "tiny").glob("*/*/status.json"))


def truncate(p: Path) -> str:
    p.write_bytes(p.read_bytes()[:17])
    return "not JSON"


def empty(p: Path) -> str:
    p.write_bytes(b"")
    return "empty file"


def directory(p: Path) -> str:
    p.unlink()
    p.mkdir()
    return "is a directory"


def loop(p: Path) -> str:
    p.unlink()
    os.symlink(p.name, p)
    return "symbolic link loop"


def not_an_object(p: Path) -> str:
    p.write_text("[1, 2]")
    return "not a JSON object"


DAMAGE: dict[str, Callable[[Path], str]] = {
    "truncated": truncate,
    "empty": empty,
    "directory": directory,
    "symlink loop": loop,
    "list": not_an_object,
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_status_is_listed_and_every_other_row_shown(done: Path, tmp_path: Path, kind: str) -> None:
    root = tmp_path / "runs"
    shutil.copytree(done, root, symlinks=True)
    bad = stages(root)[0]
    reason = DAMAGE[kind](bad)
    for args in (("status", str(TINY)), ("results", str(TINY)), ("sweep", str(TINY))):
        code, out, err = cli(*args, "--root", str(root))
        text = out + err
        assert code == DAMAGED, (args, text)
        assert "Traceback" not in text
        assert f"{bad}: {reason}" in text.replace("\n", ""), (args, text)
        if args[0] == "status":
            assert text.count("completed") == 3 and "unreadable" in text
        if args[0] == "sweep":
            assert "held back" in text and "submitted" not in text
    assert bad.is_dir() or bad.is_symlink() or bad.exists()  # the damaged record is left for the user to see


def test_a_damaged_result_is_listed_and_the_rest_of_the_table_written(done: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    shutil.copytree(done, root, symlinks=True)
    bad = sorted((root / "tiny").glob("*/knn/result.json"))[0]
    bad.write_text('{"knn_top1": 5')
    out_file = tmp_path / "r.csv"
    code, out, err = cli("results", str(TINY), "--root", str(root), "--out", str(out_file))
    assert code == DAMAGED and f"{bad}: not JSON" in (out + err).replace("\n", "")
    assert len(out_file.read_text().splitlines()) == 5  # header + every row


def test_a_truncated_manifest(done: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    shutil.copytree(done, root, symlinks=True)
    manifest = root / "tiny" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])
    code, out, err = cli("status", str(TINY), "--root", str(root))  # the file names the runs: rows shown
    assert code == DAMAGED and out.count("completed") == 4 and f"{manifest}: not JSON" in out.replace("\n", "")
    code, out, err = cli("status", f"file://{root}/tiny")  # the URL alone cannot name them
    assert code == DAMAGED and "manifest.json: not JSON" in err and "Traceback" not in out + err
    code, out, err = cli("sweep", str(TINY), "--root", str(root))  # kept aside, rewritten
    assert code == DAMAGED and "nothing to submit" in out
    assert store.read_manifest(f"{root}/tiny") is not None
    assert len(list((root / "tiny").glob("manifest.json.damaged-*"))) == 1
    assert cli("status", f"file://{root}/tiny")[0] == 0


def test_a_stage_directory_leading_outside_the_store_is_refused(done: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    shutil.copytree(done, root, symlinks=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    stage = sorted((root / "tiny").glob("*/knn"))[0]
    shutil.rmtree(stage)
    os.symlink(outside, stage)
    for args in (("status", str(TINY)), ("sweep", str(TINY))):
        code, out, err = cli(*args, "--root", str(root))
        assert code == DAMAGED and "leads outside the run store" in out + err, out + err
    assert list(outside.iterdir()) == []  # nothing written through the link


def test_a_local_sweep_survives_a_status_damaged_while_it_runs(tmp_path: Path) -> None:
    """The driver reads status.json at every poll: damaging one while stages run must not lose the jobs."""
    import threading
    import time

    root = tmp_path / "runs"
    spoiled: list[Path] = []

    def spoil() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not spoiled:
            found = sorted((root / "tiny").glob("*/knn/status.json")) if (root / "tiny").exists() else []
            if found:
                found[0].write_text("{")
                spoiled.append(found[0])
            time.sleep(0.05)

    t = threading.Thread(target=spoil)
    t.start()
    code, out, err = cli("sweep", str(TINY), "--root", str(root))
    t.join()
    assert spoiled and "lost track" not in out + err and "Traceback" not in out + err
    # The stages ran (the spoiled record was replaced when its stage wrote its state), and status agrees.
    code, out, err = cli("status", str(TINY), "--root", str(root))
    assert code == 0 and out.count("completed") == 4, out + err
