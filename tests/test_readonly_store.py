"""Read-only is a normal way to share: on a run store mounted read-only (a read-only bind mount in a private mount
namespace, so writes fail with EROFS even for root), `status`, `status --watch`, `results`, `report --out
elsewhere` and `cancel` exit with their documented codes, show what the backends say without recording it, write
nothing into the store and print no traceback."""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from extrema.run.contract import update_status
from launch.runstore import store
from tests.test_records_shape import finished

REPO = Path(__file__).resolve().parent.parent
NOTE = "the run store takes no writes here (read-only file system"


@functools.cache
def can_mount() -> str | None:
    """Why read-only bind mounts cannot be made here (not root, no unshare), or None."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "no unshare or mount"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount --bind -o ro / / 2>&1"], capture_output=True, timeout=30
    )
    return None if probe.returncode == 0 else f"cannot make a private read-only mount: {probe.stdout.decode()[:200]}"


def read_only(path: Path, *command: str) -> tuple[int, str]:
    """Run `command` with `path` mounted read-only over itself in a private mount namespace: (exit code, output)."""
    if can_mount() is not None:
        pytest.skip(str(can_mount()))
    script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, str(path), *command],
                          capture_output=True, text=True, timeout=120, env=env, cwd=path.parent)  # fmt: skip
    return proc.returncode, proc.stdout + proc.stderr


def launch(*args: str) -> tuple[str, ...]:
    return (sys.executable, "-m", "launch.cli", *args)


def snapshot(root: Path) -> dict[str, str]:
    """Every path under `root` with a digest of its content."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def shared(tmp_path: Path) -> tuple[Path, str]:
    """A finished sweep but one stage whose local job vanished (its process is gone): `status` would record it
    cancelled, were the store writable."""
    root = tmp_path / "runs"
    url = finished(root)
    stage = sorted(Path(url).glob("*/knn"))[0]
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    update_status(str(stage), state="pending", job_id=f"local-{gone.stdout.strip()}-0@{socket.gethostname()}",
                  submitted_at=1e9, finished_at=None)  # fmt: skip
    return root, url


@pytest.mark.parametrize(
    "command",
    [("status",), ("status", "--watch", "--interval", "0.1"), ("results",)],
    ids=" ".join,
)
def test_read_commands_show_the_correction_and_write_nothing(
    shared: tuple[Path, str], command: tuple[str, ...]
) -> None:
    root, url = shared
    before = snapshot(root)
    got, out = read_only(root, *launch(command[0], url, *command[1:]))
    assert got == 0 and "Traceback" not in out, out
    assert "local job" in out and "cancelled" in out, out  # the backend's word, shown
    assert out.count(NOTE) == 1 or "--watch" in command, out  # said once (a live view says it in each frame)
    assert NOTE in out
    assert snapshot(root) == before


def test_json_on_standard_output_stays_json(shared: tuple[Path, str]) -> None:
    root, url = shared
    if can_mount() is not None:
        pytest.skip(str(can_mount()))
    script = 'mount --bind -o ro "$0" "$0" && exec "$@"'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script, str(root), *launch("results", url, "--format", "json")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)  # fmt: skip
    rows = json.loads(proc.stdout)
    assert proc.returncode == 0 and len(rows) == 4 and NOTE in proc.stderr


def test_report_writes_only_its_out(shared: tuple[Path, str], tmp_path: Path) -> None:
    root, url = shared
    before = snapshot(root)
    page = tmp_path / "elsewhere" / "report.html"
    got, out = read_only(root, *launch("report", url, "--out", str(page)))
    assert got == 0 and "Traceback" not in out and "needs no network" in out, out
    assert page.is_file() and "cancelled" in page.read_text()
    assert snapshot(root) == before


def test_report_names_its_out_when_that_is_what_cannot_be_written(shared: tuple[Path, str]) -> None:
    root, url = shared
    got, out = read_only(root, *launch("report", url, "--out", str(root / "in-the-store.html")))
    assert got == 2 and "Traceback" not in out, out
    assert f"cannot write --out {root}/in-the-store.html: read-only file system" in out.replace("\n", ""), out


def test_cancel_exits_cleanly(shared: tuple[Path, str]) -> None:
    root, url = shared
    before = snapshot(root)
    got, out = read_only(root, *launch("cancel", url))
    # The jobs are stopped but the store cannot say so: cancel says which and exits 1, never a traceback.
    assert got == 1 and "Traceback" not in out, out
    assert "knn: stopped, not recorded: read-only file system" in out, out
    assert snapshot(root) == before


def test_a_stage_that_cannot_be_written_is_left_to_its_caller(shared: tuple[Path, str]) -> None:
    """`mark_ended` (the local driver's and cancel's record of an end) never raises for an unwritable stage;
    `record_ended` says why, for the callers that report it."""
    _, url = shared
    stage = sorted(Path(url).glob("*/knn"))[0]
    code = f"""
from launch.runstore import store
print("mark_ended", store.mark_ended({str(stage)!r}, "failed", "x"))
try:
    store.record_ended({str(stage)!r}, "failed", "x")
except OSError as e:
    print("record_ended", e.errno)
"""
    got, out = read_only(stage, sys.executable, "-c", code)
    assert got == 0 and "mark_ended None" in out and f"record_ended {errno.EROFS}" in out, out
    assert store.read_status(str(stage))["state"] == "pending"
