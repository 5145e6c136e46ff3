"""Checkpoints that survive corruption, full disks and node crashes: resume skips a step that does not load (and
records and moves it aside), a full disk says so, commits are fsynced before `.metadata` and fenced by the lease."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

from extrema import entry
from extrema.run import contract, lease, rundir
from extrema.train import ckpt
from launch.backends.ray.head import free_ports
from tests.stage_runs import checkpointed_model, make_run, shard

# Complete steps 4, 8 and 12, all kept.
SETUP = {"pretrain": {"steps": 12, "ckpt_every": 4, "keep_last": 5}}
GARBAGE = bytes(range(255, -1, -1)) * 8


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted tiny pretrain run."""
    run = tmp_path_factory.mktemp("uninterrupted")
    make_run(str(run), SETUP)
    assert entry.main([str(run), "pretrain"]) == 0
    assert ckpt.complete_steps(str(run / "pretrain" / "ckpt")) == [12, 8, 4]
    return run


def step_model(stage: Path, step: int) -> dict[str, torch.Tensor]:
    """The `model.*` tensors of one step, read without a model."""
    url = ckpt.step_url(str(stage / "ckpt"), step)
    meta = FsspecReader(url).read_metadata().state_dict_metadata
    want = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items() if k.startswith("model.")}  # type: ignore[union-attr]
    ckpt.load(url, want)
    return want


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def truncate(step_dir: Path) -> None:
    data = (step_dir / shard(step_dir)).read_bytes()
    (step_dir / shard(step_dir)).write_bytes(data[: len(data) // 2])


def zero_out(step_dir: Path) -> None:
    """Zeros of the same size: passes the size check, fails inside DCP's load."""
    (step_dir / shard(step_dir)).write_bytes(bytes((step_dir / shard(step_dir)).stat().st_size))


CORRUPTIONS = {
    "truncated shard": (lambda d: truncate(d), "truncated"),
    "zero-byte shard": (lambda d: (d / shard(d)).write_bytes(b""), "truncated: 0 bytes"),
    "empty .metadata": (lambda d: (d / ".metadata").write_bytes(b""), ".metadata is unreadable"),
    "garbage .metadata": (lambda d: (d / ".metadata").write_bytes(GARBAGE), ".metadata is unreadable"),
    "zeroed shard of the right size": (zero_out, "UnpicklingError"),
}


@pytest.mark.parametrize("kind", [*CORRUPTIONS, "garbage in a higher step"])
def test_resume_skips_a_corrupt_step_and_ends_as_uninterrupted(reference: Path, tmp_path: Path, kind: str) -> None:
    make_run(str(tmp_path), SETUP)
    stage, ckpt_dir = tmp_path / "pretrain", tmp_path / "pretrain" / "ckpt"
    shutil.copytree(reference / "pretrain" / "ckpt", ckpt_dir)
    if kind == "garbage in a higher step":
        shutil.rmtree(ckpt_dir / "step-12")  # the run stopped after step 8; step 16 is someone else's garbage
        bad = 16
        (ckpt_dir / "step-16").mkdir()
        (ckpt_dir / "step-16" / ".metadata").write_bytes(GARBAGE)
        (ckpt_dir / "step-16" / "__0_0.distcp").write_bytes(GARBAGE * 3)
        expected = ".metadata is unreadable"
    else:
        bad = 12
        corrupt, expected = CORRUPTIONS[kind]
        corrupt(ckpt_dir / "step-12")
    corrupted = sorted((p.name, p.stat().st_size) for p in (ckpt_dir / f"step-{bad}").iterdir())

    assert entry.main([str(tmp_path), "pretrain"]) == 0

    logged = [r["step"] for r in rundir.read_jsonl(str(stage / "metrics.jsonl")) if "loss" in r]
    assert logged == [9, 10, 11, 12]  # resumed from step 8
    skips = contract.read_status(str(stage))["checkpoint_skips"]
    assert [s["step"] for s in skips] == [bad] and expected in skips[0]["reason"], skips
    aside = list((ckpt_dir / ckpt.CORRUPT_DIR).iterdir())
    assert len(aside) == 1 and aside[0].name.startswith(f"step-{bad}-")
    assert sorted((p.name, p.stat().st_size) for p in aside[0].iterdir()) == corrupted
    assert ckpt.complete_steps(str(ckpt_dir)) == [12, 8, 4]
    assert_same(checkpointed_model(stage), checkpointed_model(reference / "pretrain"))


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    """A 7 MiB tmpfs: room for one checkpoint of the tiny run (4.6 MB), not two."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        why = f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})"
        if os.environ.get("CI"):
            pytest.fail(why)
        print(why)
        pytest.skip(why)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_during_save_fails_keeps_the_previous_step_and_resumes(reference: Path, tiny_tmpfs: Path) -> None:
    run = tiny_tmpfs / "run"
    make_run(str(run), SETUP)
    stage, ckpt_dir = run / "pretrain", str(run / "pretrain" / "ckpt")

    assert entry.main([str(run), "pretrain"]) == 1

    status = contract.read_status(str(stage))
    assert status["state"] == "failed" and "no space left on device" in status["error"].lower(), status["error"]
    assert "step-8" in status["error"]
    assert ckpt.complete_steps(ckpt_dir) == [4] and ckpt.list_steps(ckpt_dir)[8] is False
    assert_same(step_model(stage, 4), step_model(reference / "pretrain", 4))

    subprocess.run(["mount", "-o", "remount,size=64m", str(tiny_tmpfs)], check=True)
    assert entry.main([str(run), "pretrain"]) == 0
    assert ckpt.complete_steps(ckpt_dir) == [12, 8, 4]
    assert_same(checkpointed_model(stage), checkpointed_model(reference / "pretrain"))


def linear_state(seed: int) -> tuple[torch.nn.Linear, torch.optim.SGD]:
    torch.manual_seed(seed)
    model = torch.nn.Linear(8, 8)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_shards_and_directory_are_fsynced_before_metadata_is_renamed(tmp_path: Path, monkeypatch) -> None:
    step_dir = tmp_path / "ckpt" / "step-1"
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append((os.readlink(f"/proc/self/fd/{fd}"), (step_dir / ".metadata").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    model, opt = linear_state(0)
    ckpt.save(str(tmp_path / "ckpt"), 1, ckpt.training_state(model, opt, {"step": 1}))

    def first(path: Path, committed: bool) -> int:
        return synced.index((str(path), committed))

    data = first(step_dir / shard(step_dir), False)
    entries = first(step_dir, False)
    marker = first(step_dir / ".metadata.tmp", False)
    assert data < entries < marker < first(step_dir, True) < first(tmp_path / "ckpt", True), synced


def test_commit_is_fenced_by_the_lease(tmp_path: Path) -> None:
    stage = str(tmp_path / "stage")
    ckpt_dir = rundir.join(stage, "ckpt")
    held = lease.try_acquire(stage)
    assert isinstance(held, lease.Lease)
    model, opt = linear_state(0)
    ckpt.save(ckpt_dir, 1, ckpt.training_state(model, opt, {"step": 1}), held.fence)
    rundir.write_json(rundir.join(lease.lease_dir(stage), f"{held.generation + 1:08d}.json"), {"token": "x"})
    with pytest.raises(lease.LeaseLost):
        ckpt.save(ckpt_dir, 2, ckpt.training_state(model, opt, {"step": 2}), held.fence)
    assert ckpt.list_steps(ckpt_dir) == {1: True, 2: False}
    assert ckpt.latest_step(ckpt_dir) == 1


def test_an_attempt_that_writes_on_after_losing_its_stage_leaves_the_committed_step_whole(tmp_path: Path) -> None:
    """A frozen attempt that passed its fence before the data and continues after another attempt committed the same
    step: its files land beside the committed ones, its commit is refused, and the step loads the committed values."""
    ckpt_dir = str(tmp_path / "ckpt")
    model, opt = linear_state(0)
    ckpt.save(ckpt_dir, 4, ckpt.training_state(model, opt, {"step": 4}))
    committed = {p.name: p.read_bytes() for p in (tmp_path / "ckpt" / "step-4").iterdir()}
    fences: list[str] = []

    def lost_after_the_data(what: str) -> None:  # passes before the shards, refuses the commit
        fences.append(what)
        if len(fences) > 1:
            raise lease.LeaseLost("taken over")

    stale, stale_opt = linear_state(1)
    with pytest.raises(lease.LeaseLost):
        ckpt.save(ckpt_dir, 4, ckpt.training_state(stale, stale_opt, {"step": 4}), lost_after_the_data)
    assert len(fences) == 2
    after = {p.name: p.read_bytes() for p in (tmp_path / "ckpt" / "step-4").iterdir()}
    assert {n: after[n] for n in committed} == committed and len(after) == len(committed) + 1
    back, back_opt = linear_state(2)
    ckpt.restore(ckpt_dir, back, back_opt, {"step": 0})
    assert torch.equal(back.weight, model.weight) and not torch.equal(back.weight, stale.weight)


def test_interrupt_while_loading_is_not_a_corrupt_step(tmp_path: Path, monkeypatch) -> None:
    ckpt_dir = str(tmp_path / "ckpt")
    model, opt = linear_state(0)
    ckpt.save(ckpt_dir, 1, ckpt.training_state(model, opt, {"step": 1}))

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(FsspecReader, "read_data", interrupted)  # DCP wraps it in a CheckpointException
    with pytest.raises(KeyboardInterrupt):
        ckpt.restore(ckpt_dir, model, opt, {"step": 0})
    assert ckpt.complete_steps(ckpt_dir) == [1] and not (tmp_path / "ckpt" / ckpt.CORRUPT_DIR).exists()


def test_load_module_names_the_corrupt_step_and_tries_no_other(tmp_path: Path) -> None:
    ckpt_dir = str(tmp_path / "ckpt")
    for step in (1, 2):
        model, opt = linear_state(step)
        ckpt.save(ckpt_dir, step, ckpt.training_state(model, opt, {"step": step}))
    truncate(tmp_path / "ckpt" / "step-2")
    url = ckpt.step_url(ckpt_dir, 2)
    name = shard(tmp_path / "ckpt" / "step-2")
    with pytest.raises(ckpt.CheckpointError, match=f"checkpoint {url} cannot be loaded: {name} is truncated"):
        ckpt.load_module(url, torch.nn.Linear(8, 8), prefix="")
    assert ckpt.complete_steps(ckpt_dir) == [2, 1]


def test_a_step_that_fails_part_way_with_no_older_one_stops_the_run(tmp_path: Path) -> None:
    """Its tensors may be half in the model: training from there would be neither fresh nor resumed."""
    ckpt_dir = str(tmp_path / "stage" / "ckpt")
    model, opt = linear_state(0)
    ckpt.save(ckpt_dir, 1, ckpt.training_state(model, opt, {"step": 1}))
    zero_out(tmp_path / "stage" / "ckpt" / "step-1")
    with pytest.raises(ckpt.CheckpointError, match="failed part-way"):
        ckpt.restore(ckpt_dir, model, opt, {"step": 0})
    assert ckpt.complete_steps(ckpt_dir) == []
    assert ckpt.restore(ckpt_dir, model, opt, {"step": 0}) is None  # the next attempt starts afresh


RANKS_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
from extrema.train import ckpt
dist.init_process_group("gloo")
rank, ckpt_dir, out = dist.get_rank(), sys.argv[1], sys.argv[2]
torch.manual_seed(0)
model = torch.nn.Linear(8, 8)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for step in (1, 2):
    ckpt.save(ckpt_dir, step, ckpt.training_state(model, opt, {"step": step}))
if rank == 1:  # only rank 1 fails, after DCP's collective load succeeded everywhere
    real = ckpt.set_state_dict
    def once(*args, **kwargs):
        ckpt.set_state_dict = real
        raise RuntimeError("rank 1 cannot take step 2")
    ckpt.set_state_dict = once
extra = ckpt.restore(ckpt_dir, model, opt, {"step": 0})
json.dump({"extra": extra, "steps": ckpt.complete_steps(ckpt_dir)}, open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()
"""


def test_every_rank_takes_the_same_decision(tmp_path: Path) -> None:
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent(RANKS_SCRIPT))
    ckpt_dir = tmp_path / "stage" / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(free_ports(1)[0]), str(script), str(ckpt_dir), str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {"extra": {"step": 1}, "steps": [1]}
    skips = contract.read_status(str(tmp_path / "stage"))["checkpoint_skips"]
    assert skips == [{"step": 2, "reason": "rank 1: RuntimeError: rank 1 cannot take step 2"}]
    assert [p.name.split("-")[1] for p in (ckpt_dir / ckpt.CORRUPT_DIR).iterdir()] == ["2"]
    assert done.stderr.count("skipping checkpoint step 2") == 1
