"""`extrema-launch` end to end: help, plans, bad input (corpus and fuzzing), idempotent sweeps, results, failures."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from extrema.run.contract import update_status
from extrema.spec import Experiment, MaskingSpec, ModelSpec, PretrainSpec
from launch.backends.base import State, make_backend
from launch.backends.local import LocalBackend
from launch.backends.resources import ResourcesSpec
from launch.cli import main
from launch.inputs.errors import UsageError
from launch.reconcile import settled
from launch.runstore import store
from launch.sweepfile.expand import load_runs
from launch.sweepfile.model import Axes, LauncherSpec, SweepFile
from launch.views import tables
from launch.views.results_view import results_format

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "jobs" / "tiny.yaml"
BAD = sorted((Path(__file__).resolve().parent / "bad_sweeps").glob("*.yaml"))


def cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in this process; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_launch_never_imports_torch() -> None:
    code = (
        "import sys, launch.cli, launch.sweepfile.expand, launch.runstore.store, launch.runstore.results, "
        "launch.pipeline, launch.progress, "
        f"launch.backends.local; launch.cli.main(['sweep', {str(TINY)!r}, '--dry-run', '--root', 'memory://t']); "
        "[launch.cli.main([*c, '--help']) for c in (['plot'], ['viz', 'attention'], ['results'])]; "
        "assert 'torch' not in sys.modules, 'torch was imported'; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "command",
    [
        *([c] for c in ("sweep", "status", "results", "cancel", "logs", "plot", "viz", "export", "data")),
        [],
        ["viz", "attention"],
        ["data", "shard"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    code, out, _ = cli(*command, "--help")
    assert code == 0 and "usage: extrema-launch" in out


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert cli()[0] == 2
    assert cli("sweep")[0] == 2
    assert cli("frobnicate")[0] == 2
    assert cli("logs", str(TINY), "--run", "x")[0] == 2  # --stage missing
    code, _, err = cli("status", f"file://{tmp_path}/nothing")
    assert code == 2 and "no manifest.json there" in err
    code, _, err = cli("status", str(tmp_path / "missing.yaml"))
    assert code == 2 and "missing.yaml: <file>: file not found" in err
    code, _, err = cli("results", str(TINY), "--format", "parquet")
    assert code == 2 and "--out" in err
    code, _, err = cli("sweep", str(TINY), "--root", f"memory://{uuid.uuid4().hex}")
    assert code == 2 and "memory://" in err


def test_results_format_comes_from_the_flag_or_the_out_suffix(tmp_path: Path) -> None:
    assert results_format(None, None) == "table"
    assert results_format("json", None) == "json"
    assert results_format(None, "r.PARQUET") == "parquet" and results_format(None, "s3://b/r.csv") == "csv"
    assert results_format("json", "r.txt") == "json"
    for fmt, out in (("parquet", None), ("table", "r.csv"), (None, "r.txt"), (None, "results")):
        with pytest.raises(UsageError):
            results_format(fmt, out)
    code, _, err = cli("results", str(TINY), "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "r.txt"))
    assert code == 2 and "--format" in err and not (tmp_path / "r.txt").exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path: Path) -> None:
    code, out, _ = cli("sweep", str(TINY), "--root", str(tmp_path / "runs"), "--dry-run")
    _, runs = load_runs(TINY)
    assert code == 0 and not (tmp_path / "runs").exists()
    assert "model.cls_token" in out and "would submit 4 of 4 jobs to local" in out
    for r in runs:
        assert r.run_id in out and str(r.overrides["model.cls_token"]) in out


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_sweep_files_exit_2_with_file_path_and_reason(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the files' root is ./runs: nothing may appear here
    expected = path.read_text(errors="replace").splitlines()[0].removeprefix("# expect: ")
    commands = [
        ["sweep", str(path)],
        ["sweep", str(path), "--dry-run"],
        ["status", str(path)],
        ["results", str(path)],
        ["results", str(path), "--out", "results.parquet"],
        ["cancel", str(path)],
        ["logs", str(path), "--run", "0123456789", "--stage", "pretrain", "--follow"],
    ]
    for command in commands:
        code, out, err = cli(*command)
        assert code == 2, (command, out, err)
        assert expected in err and str(path.parent) in err, err
        assert "Traceback" not in out + err and len(err.splitlines()) <= 22
    assert tree(tmp_path) == []


VALID: dict[str, Any] = {
    "name": "fuzz",
    "base": {
        "model": {"arch": "vit_pico"},
        "data": {"dataset": "synthetic"},
        "pretrain": {"steps": 2, "batch_size": 8, "masking": {"ratio": 0.75, "num_masks": 2}},
    },
    "sweep": {"grid": {"model.cls_token": ["cait", "vit"]}},
    "launcher": {"backend": "local", "resources": {"cpus_per_task": 1}},
}
SECTIONS = [
    (),
    ("base",),
    ("base", "model"),
    ("base", "pretrain"),
    ("base", "pretrain", "masking"),
    ("launcher",),
    ("launcher", "resources"),
    ("sweep",),
]
MODELS = (SweepFile, Axes, LauncherSpec, ResourcesSpec, Experiment, ModelSpec, PretrainSpec, MaskingSpec)
KNOWN = {"include"} | {name for model in MODELS for name in model.model_fields}
word = st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True).filter(lambda w: w not in KNOWN)
unsafe_name = st.text(min_size=1, max_size=20).filter(lambda s: not _is_safe(s))
MUTATIONS = st.one_of(
    st.tuples(st.just("unknown_key"), st.sampled_from(SECTIONS), word),
    st.tuples(st.just("set"), st.just(("name",)), unsafe_name),
    st.tuples(
        st.just("set"),
        st.just(("base", "pretrain", "steps")),
        st.one_of(st.integers(max_value=0), word, st.lists(st.integers(), max_size=2)),
    ),
    st.tuples(
        st.just("set"),
        st.just(("base", "pretrain", "masking", "ratio")),
        st.one_of(st.floats(min_value=1.0), st.floats(max_value=-0.01)),
    ),
    st.tuples(
        st.just("set"), st.just(("base", "pretrain", "masking", "num_masks")), st.integers(min_value=5, max_value=10**6)
    ),
    st.tuples(st.just("set"), st.just(("launcher", "max_parallel")), st.integers(max_value=0)),
    st.tuples(st.just("set"), st.just(("launcher", "backend")), word),
    st.tuples(
        st.just("set"),
        st.just(("sweep", "grid")),
        st.dictionaries(st.builds(lambda w: f"model.{w}", word), st.just([1]), min_size=1, max_size=2),
    ),
    st.tuples(
        st.just("set"),
        st.just(("sweep", "zip")),
        st.tuples(st.integers(1, 4), st.integers(5, 8)).map(
            lambda n: {"pretrain.seed": list(range(n[0])), "model.cls_token": ["cait"] * n[1]}
        ),
    ),
    st.tuples(st.just("set"), st.just(("sweep", "grid", "pretrain.seed")), st.just([])),
    st.tuples(st.just("delete"), st.sampled_from([("name",), ("base",), ("base", "data")]), st.none()),
)


def _is_safe(name: str) -> bool:
    try:
        store.safe_name(name)
    except ValueError:
        return False
    return True


def mutate(doc: dict[str, Any], mutation: tuple[str, tuple[str, ...], Any]) -> None:
    kind, path, value = mutation
    node = doc
    for part in path[:-1] if kind != "unknown_key" else path:
        node = node.setdefault(part, {})
    if kind == "unknown_key":
        node[value] = 1
    elif kind == "delete":
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(MUTATIONS, min_size=1, max_size=3))
def test_fuzzed_bad_sweeps_exit_2_and_leave_the_store_untouched(tmp_path: Path, mutations: list[Any]) -> None:
    doc = json.loads(json.dumps(VALID))
    for m in mutations:
        mutate(doc, m)
    path = tmp_path / f"{uuid.uuid4().hex}.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    root = f"memory://fuzz-{uuid.uuid4().hex}"
    code, out, err = cli("sweep", str(path), "--root", root)
    assert code == 2, (mutations, out, err)
    assert str(path) in err and "Traceback" not in out + err
    assert not fsspec.filesystem("memory").exists(root.removeprefix("memory://"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_arbitrary_text_is_refused_readably(tmp_path: Path, text: str) -> None:
    path = tmp_path / "any.yaml"
    path.write_text(text)
    root = f"memory://text-{uuid.uuid4().hex}"
    code, out, err = cli("sweep", str(path), "--root", root)
    assert code == 2 and str(path) in err and "Traceback" not in out + err
    assert not fsspec.filesystem("memory").exists(root.removeprefix("memory://"))


def test_unsafe_run_ids_and_roots_from_the_command_line(tmp_path: Path) -> None:
    root = str(tmp_path / "runs")
    for run in ("../../etc", "a\nb", "$(id)", "x; rm -rf ~"):
        assert cli("logs", str(TINY), "--root", root, "--run", run, "--stage", "pretrain")[0] == 2
        assert cli("cancel", str(TINY), "--root", root, "--run", run)[0] == 2
    assert cli("sweep", str(TINY), "--root", "runs\n#x", "--dry-run")[0] == 2
    assert not (tmp_path / "runs").exists()


def test_make_backend_builds_by_name() -> None:
    backend = make_backend("local", LauncherSpec(max_parallel=3))
    assert isinstance(backend, LocalBackend) and backend.max_parallel == 3
    with pytest.raises(UsageError, match="unknown backend"):
        make_backend("kubernetes", LauncherSpec())


def test_in_flight_jobs_are_checked_with_their_backend(tmp_path: Path) -> None:
    """A 'running' stage whose local sweep process is gone is resumed; one whose process lives is left alone."""
    root = str(tmp_path / "runs")
    _, runs = load_runs(TINY)
    url = store.sweep_url(root, "tiny")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    host = os.uname().nodename
    a, b = (r.run_id for r in runs)
    update_status(
        store.stage_url(url, a, "pretrain"), state="running", backend="local", job_id=f"local-{dead}-0@{host}"
    )
    update_status(
        store.stage_url(url, b, "pretrain"), state="running", backend="local", job_id=f"local-{os.getpid()}-0@{host}"
    )
    before = store.read_statuses(url, [f"{a}/pretrain", f"{b}/pretrain"])
    code, out, _ = cli("sweep", str(TINY), "--root", root, "--dry-run")
    assert code == 0 and "would submit 2 of 4 jobs" in out
    rows = {tuple(line.split("│")[1:3]): line for line in out.splitlines() if line.count("│") > 3}
    assert "submit (resume)" in rows[(f" {a} ", " pretrain ")] and "submit (new)" in rows[(f" {a} ", " knn      ")]
    assert "already running" in rows[(f" {b} ", " pretrain ")] and "waits for" in rows[(f" {b} ", " knn      ")]
    assert store.read_statuses(url, [f"{a}/pretrain", f"{b}/pretrain"]) == before, "a dry run writes nothing"

    code, out, _ = cli("status", str(TINY), "--root", root)
    rows = {tuple(line.split("│")[1:3]): line for line in out.splitlines() if line.count("│") > 3}
    assert code == 0 and "│ cancelled │" in rows[(f" {a} ", " pretrain ")] and "was cancelled" in out
    assert "│ running   │" in rows[(f" {b} ", " pretrain ")]
    dead_status, live_status = (store.read_status(store.stage_url(url, r, "pretrain")) for r in (a, b))
    assert (
        dead_status["state"] == "cancelled" and dead_status["error"] == f"local job local-{dead}-0@{host} was cancelled"
    )
    assert live_status == before[f"{b}/pretrain"], "a stage whose sweep process lives is left alone"


def test_settled_states_from_the_backends_word() -> None:
    assert settled(None, "slurm", "7") == (None, "")
    assert settled(State.PENDING, "slurm", "7") == settled(State.PREEMPTED, "slurm", "7") == ("pending", "")
    assert settled(State.RUNNING, "ray", "x") == ("running", "")
    assert settled(State.FAILED, "slurm", "7_1") == ("failed", "slurm job 7_1 failed")
    assert settled(State.COMPLETED, "slurm", "7") == ("failed", "slurm job 7 ended without recording a result")
    assert settled(State.CANCELLED, "ray", "x") == ("cancelled", "ray job x was cancelled")
    assert settled(State.UNKNOWN, "slurm", "7") == (
        "cancelled",
        "slurm job 7 is unknown to the cluster: it vanished or ended unrecorded",
    )


def test_tiny_sweep_end_to_end_then_nothing_new(tmp_path: Path) -> None:
    root = str(tmp_path / "runs")
    code, out, err = cli("sweep", str(TINY), "--root", root)
    assert code == 0, out + err
    assert "submitted 4 of 4 jobs to local" in out and out.count("completed  ") == 4
    url = store.sweep_url(root, "tiny")
    manifest = store.read_manifest(url)
    assert manifest is not None and len(manifest["jobs"]) == 4 and manifest["backend"] == "local"
    keys = list(manifest["jobs"])
    statuses = store.read_statuses(url, keys)
    assert {s["state"] for s in statuses.values()} == {"completed"}
    assert all(s["job_id"] == manifest["jobs"][k]["job_id"] and s["attempts"] == 1 for k, s in statuses.items())

    code, out, _ = cli("sweep", str(TINY), "--root", root)
    assert code == 0 and "nothing to submit" in out and "submitted" not in out
    again = store.read_manifest(url)
    assert store.read_statuses(url, keys) == statuses and again is not None and again["jobs"] == manifest["jobs"]

    code, out, _ = cli("status", url)
    assert code == 0 and out.count("completed") == 4 and "knn_top1=" in out

    parquet = tmp_path / "results.parquet"
    assert cli("results", str(TINY), "--root", root, "--format", "parquet", "--out", str(parquet))[0] == 0
    table = pq.read_table(parquet)
    rows = table.to_pylist()
    assert [(r["stage"], r["state"]) for r in rows] == [("pretrain", "completed"), ("knn", "completed")] * 2
    assert table.schema.field("knn_top1").type == pa.float64() and 0 <= rows[1]["knn_top1"] <= 100
    assert table.schema.field("model.cls_token").type == pa.string()
    assert [r["model.cls_token"] for r in rows] == ["cait", "cait", "avgpool", "avgpool"]
    assert rows[0]["steps"] == 4 and rows[0]["world_size"] == 1 and rows[0]["git_sha"]

    code, out, _ = cli("results", url, "--format", "json")
    assert code == 0 and len(json.loads(out)) == 4
    run_id = rows[0]["run_id"]
    code, out, _ = cli("logs", url, "--run", run_id, "--stage", "pretrain")
    assert code == 0 and f"extrema.entry {url}/{run_id} pretrain" in out
    assert cli("cancel", url)[1].startswith("cancelled 0 stage job(s)")


def test_a_failing_stage_exits_1_and_is_only_retried_on_request(tmp_path: Path) -> None:
    sweep = yaml.safe_load(TINY.read_text())
    sweep["base"]["data"] = {"dataset": "imagefolder", "root": str(tmp_path / "no-such-images"), "num_workers": 0}
    sweep["sweep"] = {"grid": {"pretrain.seed": [0]}}
    path = tmp_path / "failing.yaml"
    path.write_text(yaml.safe_dump(sweep))
    root = str(tmp_path / "runs")
    code, out, _ = cli("sweep", str(path), "--root", root)
    assert code == 1 and "failed  " in out
    url = store.sweep_url(root, "tiny")
    manifest = store.read_manifest(url)
    assert manifest is not None
    (run,) = store.stored_runs(manifest)
    pretrain, knn = (store.read_status(store.stage_url(url, run.run_id, s)) for s in ("pretrain", "knn"))
    assert pretrain["state"] == "failed" and "no-such-images" in pretrain["error"]
    assert knn["state"] == "failed" and knn["error"] == f"not run: upstream {run.run_id}/pretrain failed"
    assert cli("status", url)[0] == 1
    code, out, _ = cli("sweep", str(path), "--root", root)
    assert code == 1 and "nothing to submit" in out and "--retry-failed resubmits it" in out
    code, out, _ = cli("sweep", str(path), "--root", root, "--retry-failed", "--dry-run")
    assert code == 0 and "would submit 2 of 2 jobs" in out and "submit (retry)" in out


def test_big_tables_are_a_summary_and_aligned_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [(f"r{i}", "pretrain", "completed" if i % 3 else "failed") for i in range(7)]
    pairs = [(r[1], r[2]) for r in rows]
    small, big = io.StringIO(), io.StringIO()
    tables.show(Console(file=small, width=100), "t", ("run", "stage", "state"), rows, pairs=pairs)
    monkeypatch.setattr(tables, "RICH_ROWS", 5)
    tables.show(Console(file=big, width=100), "t", ("run", "stage", "state"), rows, pairs=pairs)
    assert "┃ run" in small.getvalue() and small.getvalue().count("│ pretrain │") == 7
    text = big.getvalue()
    assert "t: 7 rows" in text and "│ pretrain │         4 │      3 │     7 │" in text, text
    lines = text.splitlines()
    assert lines[-9].split() == ["run", "stage", "state"] and [line.split()[0] for line in lines[-7:]] == [
        f"r{i}" for i in range(7)
    ]


def test_progress_without_a_terminal_plain_quiet_and_json(tmp_path: Path) -> None:
    """Piped output (as under nohup or `| tee log`): plain progress lines and state changes while the stages run;
    --quiet only the stages that end; --json-events one JSON object per line, nothing else on standard output."""
    base = [sys.executable, "-m", "launch.cli", "sweep", str(TINY)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def sweep(root: str, *extra: str) -> subprocess.CompletedProcess[str]:
        cmd = [*base, "--root", str(tmp_path / root), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)

    plain = sweep("plain", "--progress-every", "0.5")
    assert plain.returncode == 0, plain.stderr[-3000:]
    lines = plain.stdout.splitlines()
    assert any(re.search(r"running  \S+/pretrain  step \d+/4  loss \d+\.\d+  \d+ img/s", line) for line in lines)
    assert sum(bool(re.search(r"completed  \S+/(pretrain|knn)  \(\d+\.\d s\)$", line)) for line in lines) == 4
    assert lines[-1].endswith("all 4 stages have ended: 4 completed")

    quiet = sweep("quiet", "--quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    watched = [line for line in quiet.stdout.splitlines() if re.match(r"\d{4}-\d\d-\d\d ", line)]
    assert len(watched) == 5 and all("completed" in line or "have ended" in line for line in watched), watched

    events = sweep("json", "--json-events", "--progress-every", "0.5")
    assert events.returncode == 0, events.stderr[-3000:]
    parsed = [json.loads(line) for line in events.stdout.splitlines()]  # every line is an event
    ended = {e["key"] for e in parsed if e["event"] == "state" and e["state"] == "completed"}
    assert len(ended) == 4 and parsed[-1]["event"] == "done" and parsed[-1]["counts"] == {"completed": 4}
    assert any(e["event"] == "progress" and e["total_steps"] == 4 for e in parsed)
    assert "submitted 4 of 4 jobs" in events.stderr
