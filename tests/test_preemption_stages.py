"""Preemption of the supervised stages with live loader workers: SIGTERM to the whole process group (as Slurm
sends it) saves a checkpoint and exits with the requeue code; the rerun finishes bit-exactly as an
uninterrupted run of the same spec."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from extrema import entry
from extrema.train import ckpt
from tests.stage_runs import checkpointed_model, make_run
from tests.test_detect import DETECT, needs_fashion_mnist
from tests.test_finetune import FINETUNE
from tests.test_probe import PROBE
from tests.weight_sources import save_pretrain_checkpoint

WORKERS = {"data": {"num_workers": 1}}
# Enough steps that the stage is still training when the signal arrives; its step-2 checkpoint says the loop runs.
STAGES: dict[str, dict[str, Any]] = {
    "probe": {"probe": {**PROBE, "batch_size": 16, "train_size": 256, "epochs": 2, "ckpt_every": 2}},
    "finetune": {"finetune": {**FINETUNE, "batch_size": 16, "train_size": 256, "epochs": 1, "ckpt_every": 2}},
    "detect": {"detect": {**DETECT, "batch_size": 2, "epochs": 2, "log_every": 1, "ckpt_every": 2}},
}
TOTAL_STEPS = {"probe": 32, "finetune": 16, "detect": 16}
SIGNAL_AFTER = 2  # the step whose checkpoint must exist before the signal: the training loop is running


def stage_run(run: Path, stage: str) -> None:
    """A run directory with a pretrain checkpoint and the stage's spec, its loader using worker processes."""
    exp = make_run(str(run), {"stages": ["pretrain", stage], **WORKERS, **STAGES[stage]})
    save_pretrain_checkpoint(str(run / "pretrain" / "ckpt"), exp.model)


def wait_for(predicate: Callable[[], bool], timeout: float = 120.0) -> None:
    """Poll until the predicate holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def children(pid: int) -> list[int]:
    """The direct child processes of a process."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group still exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def result(stage_dir: Path) -> str:
    """The result without the run-specific checkpoint path, as canonical JSON (NaN scores compare equal)."""
    out = json.loads((stage_dir / "result.json").read_text())
    return json.dumps({k: v for k, v in out.items() if k != "checkpoint"}, sort_keys=True)


@pytest.mark.parametrize("stage", ["probe", "finetune", pytest.param("detect", marks=needs_fashion_mnist)])
def test_sigterm_to_the_process_group_saves_exits_to_requeue_then_resumes_exactly(tmp_path: Path, stage: str) -> None:
    """Signalled mid-training, workers included: exit 3, a saved step, then the rerun equals an uninterrupted run."""
    reference, run = tmp_path / "reference", tmp_path / "preempted"
    stage_run(reference, stage)
    stage_run(run, stage)
    ckpt_dir = str(run / stage / "ckpt")
    # This process's thread count in the child too: bitwise CPU results depend on it.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "extrema.entry", str(run), stage],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (ckpt.latest_step(ckpt_dir) or 0) >= SIGNAL_AFTER or proc.poll() is not None)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert children(proc.pid), "the stage's loader has no worker process"
        os.killpg(proc.pid, signal.SIGTERM)  # the stage and its loader workers alike
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == entry.EXIT_REQUEUE, stderr[-3000:]
    status = json.loads((run / stage / "status.json").read_text())
    saved = ckpt.latest_step(ckpt_dir)
    assert saved is not None and SIGNAL_AFTER <= saved < TOTAL_STEPS[stage], saved
    assert status["state"] == "preempted", status
    assert status["error"] == f"preempted at step {saved}; checkpoint saved", status
    wait_for(lambda: not group_alive(proc.pid), timeout=30)  # no loader worker outlives the stage

    assert entry.main([str(run), stage]) == 0
    assert entry.main([str(reference), stage]) == 0
    assert json.loads((run / stage / "status.json").read_text())["state"] == "completed"
    assert json.loads(result(run / stage))["steps"] == TOTAL_STEPS[stage]
    assert result(run / stage) == result(reference / stage)
    a, b = checkpointed_model(reference / stage), checkpointed_model(run / stage)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
