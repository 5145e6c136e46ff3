"""Scale-out on CPU with real processes: FSDP2 and DDP over gloo, resharding, kill -9 resume, preemption."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from extrema import entry
from extrema.models.extrema import ExtreMA
from extrema.run import contract, rundir
from extrema.spec import RunSpec
from extrema.train import ckpt
from extrema.train.safe_dcp import SafeFsspecReader
from launch.backends.ray.head import free_ports
from tests.stage_runs import make_run, shard_ranks, without_key_bias

# drop path off: its per-sample draws cannot match across world sizes.
SETUP = {"model": {"drop_path_rate": 0.0}, "pretrain": {"steps": 6, "ckpt_every": 3, "batch_size": 32}}


def free_port() -> int:
    return free_ports(1)[0]


def forked_ranks(run_dir: Path, stage: str = "pretrain", nproc: int = 2) -> subprocess.CompletedProcess:
    """Run a stage as `nproc` ranks forked by `extrema.entry --processes` (as the local backend starts it), gloo on
    the CPU. torchrun's ranks: the two-node test below, tests/test_hang_watch.py, tests/test_ckpt_recovery.py."""
    cmd = [sys.executable, "-m", "extrema.entry", f"--processes={nproc}", str(run_dir), stage]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert "outlived destroy_process_group" not in proc.stderr, proc.stderr[-3000:]  # the teardown abort's cause
    return proc


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in rundir.read_jsonl(str(run_dir / "pretrain" / "metrics.jsonl")) if "loss" in r]


def weights(run_dir: Path, step: int | None = None) -> dict[str, torch.Tensor]:
    """Every parameter of the saved ExtreMA model, loaded in one plain process (reshard to world size 1)."""
    spec = RunSpec.model_validate_json((run_dir / "pretrain" / "spec.json").read_text())
    model = ExtreMA(spec.experiment.model)
    ckpt_dir = str(run_dir / "pretrain" / "ckpt")
    ckpt.load_module(ckpt.step_url(ckpt_dir, step or ckpt.latest_step(ckpt_dir)), model, prefix="")
    return model.state_dict()


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("single")
    make_run(str(run), SETUP)
    assert entry.main([str(run), "pretrain"]) == 0
    return run


@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_processes_match_one_on_the_same_global_batch(single: Path, tmp_path: Path, strategy: str) -> None:
    make_run(str(tmp_path), {**SETUP, "pretrain": {**SETUP["pretrain"], "strategy": strategy}})
    proc = forked_ranks(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path) == pytest.approx(losses(single), rel=1e-4, abs=1e-5)
    assert weights(single).keys() == weights(tmp_path).keys()
    one, two = without_key_bias(weights(single)), without_key_bias(weights(tmp_path))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    result = json.loads((tmp_path / "pretrain" / "result.json").read_text())
    assert result["world_size"] == 2
    prov = json.loads((tmp_path / "pretrain" / "provenance.json").read_text())
    assert prov["world_size"] == 2
    if strategy == "fsdp":  # a sharded checkpoint: one data file per rank
        step_dir = tmp_path / "pretrain" / "ckpt" / "step-6"
        assert (step_dir / ".metadata").exists() and shard_ranks(step_dir) == {0, 1}
    export = ckpt.read_torch(str(tmp_path / "pretrain" / "export" / "encoder_ema.pt"))
    torch.testing.assert_close(export["norm.weight"], one["target.encoder.norm.weight"], rtol=1e-4, atol=1e-5)


def two_node_torchrun(run_dir: Path) -> list[subprocess.CompletedProcess]:
    """The pretrain stage as two one-process "nodes": two torchrun agents meeting at one rendezvous, so that each
    rank sees LOCAL_WORLD_SIZE=1 as on two machines."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
    cmd += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "hsdp"]
    cmd += ["-m", "extrema.entry", str(run_dir), "pretrain"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agents = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in "ab"]
    done = []
    for agent in agents:
        out, err = agent.communicate(timeout=240)
        done.append(subprocess.CompletedProcess(cmd, agent.returncode, out, err))
    return done


def test_hsdp_across_two_nodes_replicates_and_matches_one_process(single: Path, tmp_path: Path) -> None:
    make_run(str(tmp_path), {**SETUP, "pretrain": {**SETUP["pretrain"], "strategy": "hsdp"}})
    for proc in two_node_torchrun(tmp_path):
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path) == pytest.approx(losses(single), rel=1e-4, abs=1e-5)
    one, two = without_key_bias(weights(single)), without_key_bias(weights(tmp_path))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
    # (2 nodes, 1 rank each): parameters are replicated across the nodes, not sharded: each tensor is one whole
    # chunk in the checkpoint (FSDP over the same two ranks saves two halves).
    meta = SafeFsspecReader(str(tmp_path / "pretrain" / "ckpt" / "step-6")).read_metadata().state_dict_metadata
    params = {k: m for k, m in meta.items() if k.startswith("model.") and hasattr(m, "chunks")}
    assert params and all(len(m.chunks) == 1 for m in params.values()), {k: len(m.chunks) for k, m in params.items()}


def test_background_saves_with_two_processes_match_the_synchronous_run(single: Path, tmp_path: Path) -> None:
    """async_save's collectives run in a thread on a group of their own: no hang, the same losses and weights."""
    make_run(str(tmp_path), {**SETUP, "pretrain": {**SETUP["pretrain"], "ckpt_every": 2, "async_save": True}})
    proc = forked_ranks(tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert losses(tmp_path) == pytest.approx(losses(single), rel=1e-4, abs=1e-5)
    assert sorted(ckpt.list_steps(str(tmp_path / "pretrain" / "ckpt"))) == [4, 6]  # retention kept the last two
    one, two = without_key_bias(weights(single)), without_key_bias(weights(tmp_path))
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_two_process_checkpoint_resumes_at_two_and_loads_at_one(tmp_path: Path) -> None:
    """Reshard: a 2-rank FSDP checkpoint loads in one plain process, and a 2-rank run resumes from step 3."""
    make_run(str(tmp_path / "a"), SETUP)
    assert forked_ranks(tmp_path / "a").returncode == 0
    make_run(str(tmp_path / "b"), SETUP)
    src = tmp_path / "a" / "pretrain" / "ckpt" / "step-3"
    dst = tmp_path / "b" / "pretrain" / "ckpt" / "step-3"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    proc = forked_ranks(tmp_path / "b")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = without_key_bias(weights(tmp_path / "a")), without_key_bias(weights(tmp_path / "b"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    # Resumed at a different world size (1 process): it continues from the 2-rank state and finishes.
    make_run(str(tmp_path / "c"), SETUP)
    (tmp_path / "c" / "pretrain" / "ckpt").mkdir(parents=True)
    os.rename(dst, tmp_path / "c" / "pretrain" / "ckpt" / "step-3")
    assert entry.main([str(tmp_path / "c"), "pretrain"]) == 0
    c = without_key_bias(weights(tmp_path / "c"))
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-4, atol=1e-5)


def test_checkpoint_round_trip_on_memory_filesystem() -> None:
    model = ExtreMA(RunSpec.model_validate(_spec_json()).experiment.model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    url = f"memory://ckpt-{random.randrange(10**9)}"
    ckpt.save(url, 5, ckpt.training_state(model, opt, {"step": 5, "knn": '{"init_top1": 61.5}'}))
    assert ckpt.latest_step(url) == 5
    fresh = ExtreMA(RunSpec.model_validate(_spec_json()).experiment.model)
    extra = ckpt.restore(
        url, fresh, torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad]), {"step": 0, "knn": "{}"}
    )
    assert extra is not None and extra["step"] == 5 and json.loads(extra["knn"]) == {"init_top1": 61.5}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def _spec_json() -> dict:
    import tempfile

    d = tempfile.mkdtemp()
    make_run(d)
    return json.loads(Path(d, "pretrain", "spec.json").read_text())


def start(run_dir: Path) -> subprocess.Popen:
    """Start a pretrain stage in its own process group, with this process's thread count (bitwise CPU results
    depend on it)."""
    cmd = [sys.executable, "-m", "extrema.entry", str(run_dir), "pretrain"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    return subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def wait_for(predicate, timeout: float = 120.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


KILL_SETUP = {"pretrain": {"steps": 10, "ckpt_every": 2, "keep_last": 10}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    make_run(str(run), KILL_SETUP)
    assert entry.main([str(run), "pretrain"]) == 0
    return run


@pytest.mark.parametrize("kill_after_step", [3, 6, 9])
def test_kill_9_at_a_random_step_then_rerun_is_bitwise_identical(
    uninterrupted: Path, tmp_path: Path, kill_after_step: int
) -> None:
    make_run(str(tmp_path), KILL_SETUP)
    proc = start(tmp_path)
    wait_for(
        lambda: any(
            r.get("step", 0) >= kill_after_step for r in rundir.read_jsonl(str(tmp_path / "pretrain" / "metrics.jsonl"))
        )
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert entry.main([str(tmp_path), "pretrain"]) == 0
    assert losses(tmp_path) == losses(uninterrupted)
    a, b = weights(uninterrupted), weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_kill_during_checkpoint_save_keeps_previous_step(tmp_path: Path) -> None:
    """SIGKILL while DCP writes a large step: the partial step is never chosen; the previous one loads."""
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    url = str(tmp_path / "ckpt")
    ckpt.save(url, 1, ckpt.training_state(model, opt, {"step": 1}))
    code = (
        "import torch; from extrema.train import ckpt\n"
        "big = {'model': {'w': torch.randn(64, 1024, 1024)}}\n"
        f"ckpt.save({url!r}, 2, big)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    wait_for(lambda: (tmp_path / "ckpt" / "step-2").exists())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.list_steps(url).get(2) is False
    assert ckpt.latest_step(url) == 1
    fresh = torch.nn.Linear(4, 4)
    extra = ckpt.restore(url, fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), {"step": 0})
    assert extra == {"step": 1} and torch.equal(fresh.weight, model.weight)
    assert not (tmp_path / "ckpt" / "step-2").exists()


def test_preemption_signal_saves_and_exits_with_requeue_code_then_resumes(uninterrupted: Path, tmp_path: Path) -> None:
    """SIGUSR2 to the whole process group (as Slurm sends it), loader worker included."""
    make_run(str(tmp_path), {**KILL_SETUP, "data": {"num_workers": 1}})
    proc = start(tmp_path)
    wait_for(
        lambda: any(r.get("step", 0) >= 3 for r in rundir.read_jsonl(str(tmp_path / "pretrain" / "metrics.jsonl")))
    )
    os.killpg(proc.pid, signal.SIGUSR2)
    assert proc.wait(timeout=120) == entry.EXIT_REQUEUE
    status = json.loads((tmp_path / "pretrain" / "status.json").read_text())
    assert status["state"] == "preempted"
    saved = ckpt.latest_step(str(tmp_path / "pretrain" / "ckpt"))
    assert saved is not None and saved >= 3 and saved < 10
    assert entry.main([str(tmp_path), "pretrain"]) == 0
    assert losses(tmp_path) == losses(uninterrupted)
    a, b = weights(uninterrupted), weights(tmp_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_distributed_preemption_agrees_across_ranks(tmp_path: Path) -> None:
    """SIGUSR2 to one rank only: both ranks stop at the same agreed step and save one checkpoint together."""
    make_run(str(tmp_path), {**SETUP, "pretrain": {**SETUP["pretrain"], "steps": 400, "ckpt_every": 1000}})
    cmd = [sys.executable, "-m", "extrema.entry", "--processes=2", str(tmp_path), "pretrain"]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(
        lambda: any(r.get("step", 0) >= 20 for r in rundir.read_jsonl(str(tmp_path / "pretrain" / "metrics.jsonl")))
    )
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    workers = [int(p) for p in children]
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGUSR2)
    assert proc.wait(timeout=180) == entry.EXIT_REQUEUE, "the parent of the forked ranks passes the requeue on"
    status = json.loads((tmp_path / "pretrain" / "status.json").read_text())
    assert status["state"] == "preempted", proc.stderr.read()[-2000:] if proc.stderr else ""
    step = ckpt.latest_step(str(tmp_path / "pretrain" / "ckpt"))
    assert step is not None and step % 10 == 0 and 20 <= step < 400
    step_dir = tmp_path / "pretrain" / "ckpt" / f"step-{step}"
    assert (step_dir / ".metadata").exists() and shard_ranks(step_dir) == {0, 1}


def start_ranks(run_dir: Path, timeout_s: float) -> list[subprocess.Popen]:
    """Two plain processes of one stage (RANK/WORLD_SIZE as any launcher sets them) with a short collective timeout."""
    base = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    base.update({"WORLD_SIZE": "2", contract.COLLECTIVE_TIMEOUT_ENV: str(timeout_s)})
    cmd = [sys.executable, "-m", "extrema.entry", str(run_dir), "pretrain"]
    return [
        subprocess.Popen(
            cmd,
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_a_lost_rank_fails_the_stage_within_the_collective_timeout_naming_it(tmp_path: Path, fault: str) -> None:
    """A rank killed (its peer sees the connection close) or frozen (its peer hears nothing, as behind a cut link):
    rank 0 stops within the collective timeout and records a failure that names the lost rank and its host."""
    make_run(str(tmp_path), {**SETUP, "pretrain": {**SETUP["pretrain"], "steps": 2000, "ckpt_every": 1000}})
    ranks = start_ranks(tmp_path, timeout_s=8)
    try:
        metrics = str(tmp_path / "pretrain" / "metrics.jsonl")
        wait_for(lambda: any(r.get("step", 0) >= 3 for r in rundir.read_jsonl(metrics)))
        prov = json.loads((tmp_path / "pretrain" / "provenance.json").read_text())
        assert [r["rank"] for r in prov["ranks"]] == [0, 1]
        assert [r["pid"] for r in prov["ranks"]] == [p.pid for p in ranks]
        os.kill(ranks[1].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        t0 = time.monotonic()
        code = ranks[0].wait(timeout=60)
        took = time.monotonic() - t0
        stderr = ranks[0].stderr.read() if ranks[0].stderr else ""
        assert code == contract.EXIT_FAILED, stderr[-3000:]
        assert took < 8 + 20, took  # the timeout, plus the step in flight and the teardown
        status = json.loads((tmp_path / "pretrain" / "status.json").read_text())
        assert status["state"] == "failed" and status["hosts"] == [socket.gethostname()]
        assert f"rank 1 on {socket.gethostname()}" in status["error"], status["error"]
        assert "collective timeout 8 s" in status["error"]
        if fault == "freeze":
            assert "timed out" in status["error"].lower(), status["error"]
    finally:
        for p in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
