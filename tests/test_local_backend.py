"""The local backend with real subprocesses: dependency order, parallelism, failures, cancellation, Ctrl-C."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from launch.backends.base import Job, State
from launch.backends.local import LocalBackend
from launch.backends.resources import ResourcesSpec
from launch.cli import main
from launch.runstore import store
from tests.processes import interruptible
from tests.stage_runs import shard_ranks

TINY = Path(__file__).resolve().parent.parent / "jobs" / "tiny.yaml"

SCRIPT = """
import os, sys, time
events, key, seconds, code = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
with open(events, "a") as f: f.write(f"start {key} {time.time()} {os.getpid()}\\n")
env = os.environ
print(f"hello from {key} cuda={env.get('CUDA_VISIBLE_DEVICES')} omp={env.get('OMP_NUM_THREADS')}", flush=True)
print(f"to stderr {key}", file=sys.stderr, flush=True)
if sys.argv[5:] == ["ignore-term"]:
    import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)
time.sleep(seconds)
with open(events, "a") as f: f.write(f"end {key} {time.time()} {os.getpid()}\\n")
sys.exit(code)
"""


@dataclass(frozen=True)
class ScriptJob(Job):
    """A job whose process is a small Python script instead of a training stage."""

    events: str = ""
    seconds: float = 0.0
    code: int = 0
    ignore_term: bool = False

    def command(self) -> list[str]:
        extra = ["ignore-term"] if self.ignore_term else []
        return [sys.executable, "-c", SCRIPT, self.events, self.key, str(self.seconds), str(self.code), *extra]


def job(
    tmp: Path,
    key: str,
    after: tuple[str, ...] = (),
    seconds: float = 0.0,
    code: int = 0,
    ignore_term: bool = False,
    **resources: int,
) -> ScriptJob:
    run_id, stage = key.split("/")
    res = ResourcesSpec(**resources)
    return ScriptJob(
        key, str(tmp / "s" / run_id), stage, after, res,
        events=str(tmp / "events"), seconds=seconds, code=code, ignore_term=ignore_term,
    )  # fmt: skip


def wait_all(backend: LocalBackend, ids: dict[str, str], timeout: float = 20.0) -> dict[str, State]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = backend.status(list(ids.values()))
        if all(s in (State.COMPLETED, State.FAILED, State.CANCELLED) for s in states.values()):
            return {k: states[v] for k, v in ids.items()}
        time.sleep(0.05)
    raise AssertionError(f"jobs did not end: {backend.status(list(ids.values()))}")


def events(tmp: Path) -> list[tuple[str, str, float, int]]:
    path = tmp / "events"
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines()]
    return [(kind, key, float(t), int(pid)) for kind, key, t, pid in rows]


def test_runs_in_dependency_order_one_at_a_time(tmp_path: Path) -> None:
    jobs = [
        job(tmp_path, "a/pretrain", seconds=0.3),
        job(tmp_path, "b/pretrain"),
        job(tmp_path, "a/knn", ("a/pretrain",)),
    ]
    backend = LocalBackend(max_parallel=1)
    ids = backend.submit(jobs, str(tmp_path / "logs"))
    assert set(ids) == {"a/pretrain", "b/pretrain", "a/knn"} and len(set(ids.values())) == 3
    assert wait_all(backend, ids) == dict.fromkeys(ids, State.COMPLETED)
    ev = events(tmp_path)
    assert [(kind, key) for kind, key, _, _ in ev] == [
        ("start", "a/pretrain"), ("end", "a/pretrain"), ("start", "b/pretrain"), ("end", "b/pretrain"),
        ("start", "a/knn"), ("end", "a/knn"),
    ]  # fmt: skip
    log = (tmp_path / "s" / "a" / "pretrain" / "logs" / "local.1.log").read_text()
    assert f"job {ids['a/pretrain']}" in log and "hello from a/pretrain" in log and "to stderr a/pretrain" in log


def test_parallel_jobs_overlap_and_the_limit_holds(tmp_path: Path) -> None:
    jobs = [job(tmp_path, f"{r}/pretrain", seconds=0.6) for r in "abc"]
    backend = LocalBackend(max_parallel=2, cpus=4)
    ids = backend.submit(jobs, "")
    assert set(wait_all(backend, ids).values()) == {State.COMPLETED}
    ev = events(tmp_path)
    spans = {key: [t for kind, k, t, _ in ev if k == key] for key in ids}
    (a0, a1), (b0, b1), (c0, _) = spans["a/pretrain"], spans["b/pretrain"], spans["c/pretrain"]
    assert b0 < a1 and a0 < b1, "the first two jobs ran at the same time"
    assert c0 >= min(a1, b1), "the third waited for a free slot"


def spans(tmp: Path) -> dict[str, tuple[float, float]]:
    """(start, end) time of each script job that ran."""
    ev = events(tmp)
    return {
        key: (t, next(t2 for k2, key2, t2, _ in ev if k2 == "end" and key2 == key))
        for k, key, t, _ in ev
        if k == "start"
    }


def test_cpu_budget_runs_a_large_job_alone_then_small_ones_together(tmp_path: Path) -> None:
    jobs = [
        job(tmp_path, "big/pretrain", seconds=0.5, cpus_per_task=1, processes_per_node=2),
        job(tmp_path, "a/pretrain", seconds=0.5),
        job(tmp_path, "b/pretrain", seconds=0.5),
        job(tmp_path, "huge/pretrain", cpus_per_task=8),
    ]
    backend = LocalBackend(max_parallel=4, cpus=2, gpus=())
    ids = backend.submit(jobs, "")
    assert set(wait_all(backend, ids).values()) == {State.COMPLETED}
    s = spans(tmp_path)
    assert s["a/pretrain"][0] >= s["big/pretrain"][1] and s["b/pretrain"][0] >= s["big/pretrain"][1]
    assert s["a/pretrain"][0] < s["b/pretrain"][1] and s["b/pretrain"][0] < s["a/pretrain"][1], "a and b overlap"
    assert s["huge/pretrain"][0] >= max(s["a/pretrain"][1], s["b/pretrain"][1]), "larger than the machine: alone"


def test_gpus_are_pinned_per_job_and_an_impossible_ask_fails(tmp_path: Path) -> None:
    jobs = [job(tmp_path, f"{r}/pretrain", seconds=0.5, gpus_per_node=1) for r in "abc"]
    jobs.append(job(tmp_path, "d/pretrain", gpus_per_node=3))
    backend = LocalBackend(max_parallel=4, cpus=8, gpus=("0", "1"))
    ids = backend.submit(jobs, "")
    states = wait_all(backend, ids)
    assert states == {"a/pretrain": State.COMPLETED, "b/pretrain": State.COMPLETED, "c/pretrain": State.COMPLETED,
                      "d/pretrain": State.FAILED}  # fmt: skip
    assert store.read_status(str(tmp_path / "s" / "d" / "pretrain"))["error"] == "asks 3 GPU(s); this machine has 2"
    seen = {r: (tmp_path / "s" / r / "pretrain" / "logs" / "local.1.log").read_text() for r in "abc"}
    assert "cuda=0" in seen["a"] and "cuda=1" in seen["b"] and ("cuda=0" in seen["c"] or "cuda=1" in seen["c"])
    s = spans(tmp_path)
    assert s["c/pretrain"][0] >= min(s["a/pretrain"][1], s["b/pretrain"][1]), "c waited for a free GPU"


def test_a_spec_that_sets_cpus_per_task_sets_the_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    jobs = [job(tmp_path, "one/pretrain", cpus_per_task=1), job(tmp_path, "free/pretrain")]
    backend = LocalBackend(max_parallel=2, cpus=2, gpus=())
    ids = backend.submit(jobs, "")
    assert set(wait_all(backend, ids).values()) == {State.COMPLETED}
    seen = {r: (tmp_path / "s" / r / "pretrain" / "logs" / "local.1.log").read_text() for r in ("one", "free")}
    assert "omp=1" in seen["one"], seen["one"]
    assert "omp=1" in seen["free"], "a spec silent on CPUs, beside another job: its share of the 2 CPUs"


def test_jobs_side_by_side_split_the_cpus_and_a_job_alone_keeps_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without cpus_per_task, the processes of `max_parallel` jobs share the machine's CPUs (each taking every core,
    their OpenMP threads spin for cores the other job holds); one job at a time keeps torch's own count."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    wide = LocalBackend(max_parallel=2, cpus=8, gpus=())
    ids = wide.submit([job(tmp_path, "a/pretrain"), job(tmp_path, "b/pretrain", processes_per_node=2)], "")
    assert set(wait_all(wide, ids).values()) == {State.COMPLETED}
    narrow = LocalBackend(max_parallel=1, cpus=8, gpus=())
    ids = narrow.submit([job(tmp_path, "c/pretrain")], "")
    assert set(wait_all(narrow, ids).values()) == {State.COMPLETED}
    seen = {r: (tmp_path / "s" / r / "pretrain" / "logs" / "local.1.log").read_text() for r in "abc"}
    assert "omp=4" in seen["a"] and "omp=2" in seen["b"] and "omp=None" in seen["c"], seen
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # a user's own setting stands
    ids = wide.submit([job(tmp_path, "d/pretrain")], "")
    assert set(wait_all(wide, ids).values()) == {State.COMPLETED}
    assert "omp=3" in (tmp_path / "s" / "d" / "pretrain" / "logs" / "local.1.log").read_text()


def test_a_two_process_fsdp_stage_forks_its_ranks_from_one_process_from_a_sweep_file(tmp_path: Path) -> None:
    sweep = yaml.safe_load(TINY.read_text())
    sweep["base"]["stages"] = ["pretrain"]
    sweep["base"]["pretrain"].update(steps=2, ckpt_every=2, strategy="fsdp")
    sweep.pop("sweep")
    sweep["launcher"]["resources"]["processes_per_node"] = 2
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(sweep))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["sweep", str(path), "--root", str(tmp_path / "runs")])
    assert code == 0, out.getvalue() + err.getvalue()
    (stage,) = (tmp_path / "runs" / "tiny").glob("*/pretrain")
    log = (stage / "logs" / "local.1.log").read_text()
    assert "-m extrema.entry --processes=2 " in log.splitlines()[0]
    provenance = json.loads((stage / "provenance.json").read_text())
    assert provenance["world_size"] == 2
    assert "rank 1 of 2" in log and "rank 0 of 2" in log, log
    assert json.loads((stage / "result.json").read_text())["steps"] == 2
    assert json.loads((stage / "status.json").read_text())["state"] == "completed"
    step_dir = stage / "ckpt" / "step-2"
    assert shard_ranks(step_dir) == {0, 1} and len(list(step_dir.glob("*.distcp"))) == 2


def test_ranks_are_forked_on_cpus_and_started_by_torchrun_on_gpus(tmp_path: Path) -> None:
    def command(**resources: int) -> list[str]:
        return Job("r/pretrain", str(tmp_path / "r"), "pretrain", (), ResourcesSpec(**resources)).command()

    entry = ["-m", "extrema.entry", str(tmp_path / "r"), "pretrain"]
    assert command() == [sys.executable, *entry]
    assert command(processes_per_node=4) == [sys.executable, *entry[:2], "--processes=4", *entry[2:]]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *entry]
    assert command(processes_per_node=2, gpus_per_node=2) == torchrun
    assert command(processes_per_node=1, gpus_per_node=1) == [sys.executable, *entry]
    assert command(nodes=2, processes_per_node=2) == [sys.executable, *entry]  # the backend's ranks, not one node's


def test_a_failed_job_fails_and_its_downstream_is_not_run(tmp_path: Path) -> None:
    jobs = [job(tmp_path, "a/pretrain", code=5), job(tmp_path, "a/knn", ("a/pretrain",)), job(tmp_path, "b/pretrain")]
    backend = LocalBackend(max_parallel=1)
    ids = backend.submit(jobs, "")
    assert wait_all(backend, ids) == {"a/pretrain": State.FAILED, "a/knn": State.FAILED, "b/pretrain": State.COMPLETED}
    assert [k for kind, k, _, _ in events(tmp_path) if kind == "start"] == ["a/pretrain", "b/pretrain"]
    pretrain, knn = (store.read_status(str(tmp_path / "s" / "a" / s)) for s in ("pretrain", "knn"))
    assert (pretrain["state"], pretrain["error"]) == ("failed", "exit code 5")
    assert (knn["state"], knn["error"]) == ("failed", "not run: upstream a/pretrain failed")
    assert not (tmp_path / "s" / "a" / "knn" / "logs").exists()


def test_cancel_terminates_then_kills_and_records_cancelled(tmp_path: Path) -> None:
    jobs = [job(tmp_path, "a/pretrain", seconds=30, ignore_term=True), job(tmp_path, "a/knn", ("a/pretrain",))]
    backend = LocalBackend(max_parallel=1, grace_s=0.5)
    ids = backend.submit(jobs, "")
    deadline = time.monotonic() + 10
    while not events(tmp_path) and time.monotonic() < deadline:
        backend.status(list(ids.values()))
        time.sleep(0.05)
    (_, _, _, pid) = events(tmp_path)[0]
    t0 = time.monotonic()
    backend.cancel(list(ids.values()))
    assert time.monotonic() - t0 < 5
    assert backend.status(list(ids.values())) == dict.fromkeys(ids.values(), State.CANCELLED)
    assert not os.path.exists(f"/proc/{pid}"), "SIGTERM was ignored, so SIGKILL followed"
    for stage in ("pretrain", "knn"):
        assert store.read_status(str(tmp_path / "s" / "a" / stage))["state"] == "cancelled"


def test_a_stage_cancelled_in_the_store_is_stopped(tmp_path: Path) -> None:
    backend = LocalBackend(max_parallel=1, grace_s=2)
    ids = backend.submit([job(tmp_path, "a/pretrain", seconds=30)], "")
    while not events(tmp_path):
        backend.status(list(ids.values()))
        time.sleep(0.05)
    store.mark_ended(str(tmp_path / "s" / "a" / "pretrain"), "cancelled", "cancelled by user")
    assert wait_all(backend, ids, timeout=10) == {"a/pretrain": State.CANCELLED}


def test_jobs_of_other_processes() -> None:
    backend = LocalBackend()
    host = socket.gethostname()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout
    got = backend.status(
        [f"local-{os.getpid()}-99@{host}", f"local-{dead.strip()}-0@{host}", "local-1-0@elsewhere", "123_4"]
    )
    # A job of a live sweep (queued or running: its stage's status.json says which) is left out, not guessed; one
    # whose sweep process is gone was stopped with it; one of another host is there, unseen (`sweep` follows it).
    assert got == {
        f"local-{dead.strip()}-0@{host}": State.CANCELLED,
        "local-1-0@elsewhere": State.ELSEWHERE,
        "123_4": State.UNKNOWN,
    }


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_stops_children_and_leaves_them_resumable(tmp_path: Path, sig: signal.Signals) -> None:
    driver = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from rich.console import Console
        from launch.backends.local import LocalBackend
        from launch.submit import run_blocking
        from test_local_backend import job
        tmp = Path({str(tmp_path)!r})
        jobs = [job(tmp, "a/pretrain", seconds=60), job(tmp, "a/knn", ("a/pretrain",))]
        backend = LocalBackend(max_parallel=1, grace_s=5)
        ids = backend.submit(jobs, "")
        sys.exit(run_blocking(backend, ids, {{j.key: j for j in jobs}}, Console()))
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=interruptible,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while not events(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    (_, _, _, child) = events(tmp_path)[0]
    time.sleep(2.0)  # the child starts in submit(); the driver installs its handlers when run_blocking begins
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=90)  # a 5 s grace period, but a loaded CI machine can be slow to react
    assert proc.returncode == 130, out
    assert "interrupted" in out and "resumes" in out
    assert not os.path.exists(f"/proc/{child}")
    assert [kind for kind, *_ in events(tmp_path)] == ["start"], "the child was stopped before it finished"
    for stage in ("pretrain", "knn"):
        assert store.read_status(str(tmp_path / "s" / "a" / stage))["state"] == "cancelled"
