"""Hostile input to `extrema-launch` is refused at validation: exit 2, one line naming the cause, nothing written,
and fast and small (the oversize cases run the CLI in a subprocess under a wall-clock limit and a memory bound)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from launch.inputs import yamlfile
from launch.runstore import roots, store
from launch.sweepfile.expand import load_runs
from launch.sweepfile.model import MAX_RUNS
from tests.test_cli import cli, tree

REPO = Path(__file__).resolve().parent.parent
TINY: dict[str, Any] = yaml.safe_load((REPO / "jobs" / "tiny.yaml").read_text())
LIMIT_S = 10.0  # wall clock for one refused CLI call, start-up included, on two shared cores
LIMIT_MB = 300  # peak resident memory of that call (the CLI alone takes ~90 MB)
ESC = "\x1b"


def sweep_doc(**changes: Any) -> dict[str, Any]:
    """The tiny sweep with top-level keys replaced."""
    doc = json.loads(json.dumps(TINY))
    doc.update(changes)
    return doc


def write(path: Path, doc: dict[str, Any] | str) -> Path:
    """Write a sweep (a document, or YAML text) and return its path."""
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


# The CLI, reporting its own peak resident memory (VmHWM: this process's, not the forked test runner's).
CHILD = """
import os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # a regression fails here, not on the shared machine
from launch.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    peak = next(line.split()[1] for line in f if line.startswith("VmHWM"))
with open(os.environ["PEAK_FILE"], "w") as f:
    f.write(peak)
sys.exit(code)
"""


def run_bounded(args: list[str], cwd: Path) -> tuple[int, str, float, float]:
    """`extrema-launch ARGS` in a subprocess: (exit code, stderr, seconds, peak MB); fails past LIMIT_S."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("peak memory is read from /proc")
    err, peak = cwd / "stderr.txt", cwd / "peak.txt"
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PEAK_FILE": str(peak), "PYTHONPATH": path}
    start = time.monotonic()
    with err.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=f, env=env
        )
    try:
        code = proc.wait(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"extrema-launch {args[0]} was still running after {LIMIT_S} s")
    seconds = time.monotonic() - start
    text = err.read_text()
    peak_mb = int(peak.read_text()) / 1024
    err.unlink()
    peak.unlink()
    return code, text, seconds, peak_mb


def assert_refused(code: int, err: str, *expected: str) -> str:
    """Exit 2 with the reason on one line (after the heading) and no traceback; that line."""
    assert code == 2, err
    assert "Traceback" not in err and ESC not in err, err
    lines = [line for line in err.splitlines() if not line.startswith("invalid sweep")]
    assert len(lines) == 1, err
    assert all(e in lines[0] for e in expected), err
    assert len(lines[0]) < 600, err
    return lines[0]


# --- exhaustion: refused before anything is expanded or constructed, in bounded time and memory ------------------


def billion_laughs() -> str:
    """The classic: ten levels of nine, 9^10 (3.5 billion) strings once expanded, from 0.6 KB of YAML."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev, name = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]")
    body = "\n".join("      " + line for line in lines)
    return f"name: lol\nbase:\n  model: {{arch: vit_pico}}\n  data:\n    dataset: synthetic\n    extra:\n{body}\n"


def oversize_cases(tmp: Path) -> dict[str, tuple[Path, tuple[str, ...]]]:
    """name -> (sweep file, expected parts of the one-line reason)."""
    grid6 = {"pretrain.seed": list(range(1000)), "pretrain.base_lr": [1e-5 * (i + 1) for i in range(1000)]}
    grid12 = {
        **grid6,
        "pretrain.weight_decay": [0.001 * i for i in range(1000)],
        "pretrain.warmup_epochs": list(range(1000)),
    }
    huge = "x: [" + ",".join(["1"] * 5_500_000) + "]\n"  # 11 MB
    many = "name: t\nbase:\n  k: [" + ",".join(["1"] * 400_000) + "]\n"  # 0.8 MB, 400,000 values
    deep = "name: t\nbase: " + "[" * 200_000 + "]" * 200_000 + "\n"
    return {
        "grid of 10^6 runs": (
            write(tmp / "grid6.yaml", sweep_doc(sweep={"grid": grid6})),
            ("sweep: 1,000,000 runs (1000 pretrain.seed x 1000 pretrain.base_lr)", f"max_runs ({MAX_RUNS:,})"),
        ),
        "grid of 10^12 runs": (
            write(tmp / "grid12.yaml", sweep_doc(sweep={"grid": grid12})),
            ("sweep: 1,000,000,000,000 runs", "nothing was expanded"),
        ),
        "billion laughs": (write(tmp / "lol.yaml", billion_laughs()), ("more than 50,000 values (aliases expanded)",)),
        "11 MB file": (
            write(tmp / "huge.yaml", huge),
            (f"huge.yaml: <file>: the file has {len(huge):,} bytes", "1 MiB"),
        ),
        "400,000 values": (write(tmp / "many.yaml", many), ("many.yaml:3: <file>: the document has more than",)),
        "200,000 levels": (write(tmp / "deep.yaml", deep), ("deep.yaml:2: <file>: the document nests more than 64",)),
        "recursive alias": (write(tmp / "rec.yaml", "name: t\nbase: &b {x: *b}\n"), ("a recursive document",)),
    }


@pytest.mark.parametrize(
    "case",
    [
        "grid of 10^6 runs",
        "grid of 10^12 runs",
        "billion laughs",
        "11 MB file",
        "400,000 values",
        "200,000 levels",
        "recursive alias",
    ],
)
def test_oversize_input_is_refused_fast_and_small(tmp_path: Path, case: str) -> None:
    path, expected = oversize_cases(tmp_path)[case]
    code, err, seconds, peak_mb = run_bounded(["sweep", str(path), "--root", str(tmp_path / "runs")], tmp_path)
    assert_refused(code, err, str(path), *expected)
    assert peak_mb < LIMIT_MB, f"{case}: {peak_mb:.0f} MB"
    assert not (tmp_path / "runs").exists()
    print(f"{case}: refused in {seconds:.2f} s, {peak_mb:.0f} MB")


def test_max_runs_is_a_validated_setting_of_the_sweep_file(tmp_path: Path) -> None:
    grid = {"pretrain.seed": list(range(3))}
    code, _, err = cli(
        "sweep", str(write(tmp_path / "a.yaml", sweep_doc(sweep={"grid": grid}, max_runs=2))), "--dry-run"
    )
    assert_refused(code, err, "a.yaml", "sweep: 3 runs (3 pretrain.seed): more than max_runs (2)")
    code, out, err = cli(
        "sweep", str(write(tmp_path / "b.yaml", sweep_doc(sweep={"grid": grid}, max_runs=3))), "--dry-run"
    )
    assert code == 0 and "3 runs" in out, err
    code, _, err = cli("sweep", str(write(tmp_path / "c.yaml", sweep_doc(max_runs=10**9))), "--dry-run")
    assert_refused(code, err, "c.yaml", "max_runs: Input should be less than or equal to 1000000")
    runs = [{"pretrain.steps": i + 1} for i in range(4)]
    zipped = {"pretrain.base_lr": [0.1, 0.2], "pretrain.weight_decay": [0.1, 0.2]}
    doc = sweep_doc(sweep={"runs": runs, "grid": grid, "zip": zipped}, max_runs=20)
    code, _, err = cli("sweep", str(write(tmp_path / "d.yaml", doc)), "--dry-run")
    assert_refused(code, err, "24 runs (4 runs x 3 pretrain.seed x 2 zipped): more than max_runs (20)")


def test_includes_count_towards_the_size_limit(tmp_path: Path) -> None:
    part = "base:\n  model: {arch: vit_pico}\n# " + "x" * 600_000 + "\n"
    write(tmp_path / "part.yaml", part)
    top = "include: [part.yaml]\nname: t\n# " + "y" * 500_000 + "\n"
    code, _, err = cli("sweep", str(write(tmp_path / "top.yaml", top)), "--dry-run")
    left = yamlfile.MAX_YAML_BYTES - len(top)
    assert_refused(code, err, f"part.yaml: <file>: the file has {len(part):,} bytes", f"({left:,} left after the files")


def test_refusals_quote_at_most_a_short_cut_of_the_offending_value(tmp_path: Path) -> None:
    base = sweep_doc()["base"]
    cases = [
        (sweep_doc(**{"k" * 100_000: 1}), "kkkkkkk...", "unknown key 'kkkkk"),
        (sweep_doc(base={**base, "pretrain": {"steps": "s" * 100_000}}), "base.pretrain.steps", "(got 'sssss"),
        (sweep_doc(name=f"{ESC}]0;pwned{chr(7)}"), "name", "name '\\x1b]0;pwned\\x07' is not allowed"),
    ]
    for i, (doc, path, reason) in enumerate(cases):
        code, _, err = cli("sweep", str(write(tmp_path / f"{i}.yaml", doc)), "--dry-run")
        line = assert_refused(code, err, f"{i}.yaml", path, reason)
        assert chr(7) not in line and len(line) < 600, line


# --- validation complete before anything is written: every Slurm and Ray launcher field -----------------------------


LAUNCHERS = [
    (
        {"backend": "slurm", "resources": {"sbatch_extra": {"comment": "$(touch /tmp/x)"}}},
        "launcher.resources.sbatch_extra",
    ),
    ({"backend": "slurm", "resources": {"partition": "gpu$(id)"}}, "launcher.resources.partition"),
    ({"backend": "slurm", "resources": {"account": "a;b"}}, "launcher.resources.account"),
    ({"backend": "slurm", "resources": {"qos": "`id`"}}, "launcher.resources.qos"),
    ({"backend": "slurm", "resources": {"constraint": "a b"}}, "launcher.resources.constraint"),
    ({"backend": "slurm", "resources": {"sbatch_extra": {"x y": "1"}}}, "launcher.resources.sbatch_extra"),
    ({"backend": "slurm", "resources": {"sbatch_extra": {"output": "/etc/x"}}}, "set by the launcher itself"),
    ({"backend": "slurm", "resources": {"mem_gb": float("inf")}}, "launcher.resources.mem_gb"),
    (
        {"backend": "slurm", "stages": {"knn": {"sbatch_extra": {"comment": "$(id)"}}}},
        "launcher.stages.knn.sbatch_extra",
    ),
    ({"backend": "slurm", "stages": {"pretrain": {"partition": "p$(id)"}}}, "launcher.stages.pretrain.partition"),
    ({"backend": "slurm", "slurm_folder": "s3://bucket/logs"}, "launcher.slurm_folder"),
    ({"backend": "ray", "ray_address": "host:1; rm -rf ~"}, "launcher.ray_address"),
    ({"backend": "ray", "ray_address": "host:1\n"}, "launcher.ray_address"),
]


@pytest.mark.parametrize(("launcher", "named"), LAUNCHERS, ids=[n for _, n in LAUNCHERS])
def test_unsafe_launcher_fields_are_refused_at_validation(tmp_path: Path, launcher: dict[str, Any], named: str) -> None:
    path = write(tmp_path / "s.yaml", sweep_doc(launcher=launcher))
    root = tmp_path / "runs"
    for command in (["sweep", str(path), "--root", str(root)], ["sweep", str(path), "--dry-run"]):
        code, _, err = cli(*command)
        assert_refused(code, err, str(path), named)
    assert not root.exists()


def test_a_bad_default_resource_is_reported_once_not_per_stage(tmp_path: Path) -> None:
    launcher = {"backend": "slurm", "resources": {"partition": "gpu$(id)"}, "stages": {"knn": {"cpus_per_task": 2}}}
    code, _, err = cli("sweep", str(write(tmp_path / "s.yaml", sweep_doc(launcher=launcher))), "--dry-run")
    assert_refused(code, err, "launcher.resources.partition")


def test_slurm_needs_a_shared_log_folder_when_the_root_is_not_local(tmp_path: Path) -> None:
    path = write(tmp_path / "s.yaml", sweep_doc(launcher={"backend": "slurm"}, root="memory://somewhere"))
    code, _, err = cli("sweep", str(path), "--dry-run")
    assert_refused(code, err, "launcher.slurm_folder: the slurm backend writes its logs to a shared filesystem")
    path = write(tmp_path / "t.yaml", sweep_doc(launcher={"backend": "slurm", "slurm_folder": str(tmp_path / "logs")}))
    code, _, err = cli("sweep", str(path), "--dry-run", "--root", "memory://somewhere")
    assert code == 0, err


# --- bad roots ------------------------------------------------------------------------------------------------------


def closed_port() -> int:
    """A local TCP port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing_backends() -> list[tuple[str, str]]:
    """(root, package) for fsspec protocols whose package is not installed here."""
    return [(f"{p}://bucket/runs", pkg) for p, pkg in (("s3", "s3fs"), ("gs", "gcsfs")) if roots.backend_problem(p)]


@pytest.mark.parametrize(
    ("root", "expected"),
    [
        ("nosuchproto://x/runs", "fsspec knows no protocol 'nosuchproto'"),
        ("file://", "has no path: a file:// root is file:///absolute/path"),
        ("file:///", "names the filesystem root"),
        ("file://runs", "has a relative path or a host"),
        ("/", "is the filesystem root"),
        *((r, f"needs the package {pkg}, which is not installed (pip install {pkg})") for r, pkg in missing_backends()),
    ],
)
def test_roots_that_cannot_be_a_run_store_are_refused_at_validation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, root: str, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "s.yaml", sweep_doc())
    for command in (["sweep", str(path), "--root", root], ["sweep", str(path), "--dry-run", "--root", root]):
        code, _, err = cli(*command)
        assert_refused(code, err, f"root '{root}'", expected)
    code, _, err = cli("status", root)
    assert_refused(code, err, f"root '{root}'", expected)
    assert tree(tmp_path) == ["s.yaml"]


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot write into (a read-only mount, or mode 555 when not root)."""
    if os.geteuid() != 0:
        (tmp_path / "ro").mkdir(mode=0o555)
        return tmp_path / "ro"
    if os.path.isdir("/proc/sys") and not os.access("/proc/sys", os.W_OK):
        return Path("/proc/sys")  # read-only for root too
    pytest.skip("no directory here is read-only for root")


def test_unusable_roots_are_refused_before_anything_is_written(tmp_path: Path) -> None:
    path = write(tmp_path / "s.yaml", sweep_doc())
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    http = f"http://127.0.0.1:{closed_port()}/runs"
    read_only = unwritable_dir(tmp_path)
    cases = [
        (str(a_file), ["sweep", "sweep --dry-run", "status"], f"{a_file} is a file, not a directory"),
        (http, ["sweep", "sweep --dry-run", "status"], "cannot be reached: ClientConnectorError"),
        (str(read_only / "runs"), ["sweep"], f"{read_only} is not writable (read-only filesystem or no permission)"),
    ]
    for root, commands, expected in cases:
        for command in commands:
            code, _, err = cli(*command.split(), str(path), "--root", root)
            line = assert_refused(code, err, f"run store {root}/tiny: ", expected)
            assert line.startswith("extrema-launch: run store"), line
    code, out, err = cli("sweep", str(path), "--dry-run", "--root", str(read_only / "runs"))
    assert code == 0 and "nothing written" in out, err  # a dry run or a status may read a read-only store
    assert a_file.read_text() == "x" and not (read_only / "runs").exists()
    assert {p.name for p in tmp_path.iterdir()} <= {"a-file", "s.yaml", "ro"}
    assert not (tmp_path / "ro").exists() or not any((tmp_path / "ro").iterdir())


# --- terminal escapes --------------------------------------------------------------------------------------------


def test_control_characters_in_swept_values_are_shown_escaped(tmp_path: Path) -> None:
    red, title = f"{ESC}[31mred", f"{ESC}]0;pwned{chr(7)}"
    doc = sweep_doc(sweep={"grid": {"data.train_split": [red, title]}})
    path = write(tmp_path / "esc.yaml", doc)
    root = str(tmp_path / "runs")
    sweep, runs = load_runs(path, root=root)  # status shows a sweep once submitted: its manifest written as then
    launcher = sweep.launcher.model_dump(mode="json")
    manifest = store.sweep_manifest(sweep.name, root, str(path), launcher, "", [r.stored() for r in runs])
    for command in (["sweep", str(path), "--dry-run", "--root", root], ["results", str(path), "--root", root]):
        code, out, err = cli(*command)
        assert code == 0, (command, err)
        assert ESC not in out + err and chr(7) not in out + err, command
        assert "\\x1b[31mred" in out and "\\x1b]0;pwned\\x07" in out, (command, out)
    store.write_manifest(store.sweep_url(root, sweep.name), manifest)
    for command in (["status", str(path), "--root", root],):
        code, out, err = cli(*command)
        assert code == 0, (command, err)
        assert ESC not in out + err and chr(7) not in out + err, command
        assert "\\x1b[31mred" in out and "\\x1b]0;pwned\\x07" in out, (command, out)


# --- a hostile run store: every record read is bounded before it is parsed ----------------------------------------


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("status.json", b"[" * 1_000_000),  # 1 MB of nesting, never closed
        ("result.json", b'{"a":' * 200_000 + b"1" + b"}" * 200_000),
        ("status.json", b'{"state": "completed", "attempts": ' + b"9" * 900_000 + b"}"),
    ],
    ids=["unclosed nesting", "deep result", "a 900,000-digit integer"],
)
def test_a_hostile_record_in_the_store_is_listed_fast_and_small(tmp_path: Path, name: str, data: bytes) -> None:
    from tests.test_records_shape import finished

    url = finished(tmp_path / "runs")
    bad = sorted(Path(url).glob(f"*/pretrain/{name}"))[0]
    bad.write_bytes(data)
    for command in ("status", "results"):
        code, err, seconds, peak_mb = run_bounded([command, url], tmp_path)
        assert code == 3 and "Traceback" not in err, (command, err)
        assert peak_mb < LIMIT_MB, f"{command}: {peak_mb:.0f} MB"
        print(f"{command} of {name}: listed in {seconds:.2f} s, {peak_mb:.0f} MB")
