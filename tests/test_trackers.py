"""TensorBoard and W&B (offline) receive every metric of a stage, read back with the libraries' own readers, and a
stage killed and resumed leaves each step there once, with the values of metrics.jsonl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from extrema.run import contract, rundir
from extrema.spec import Experiment, RunSpec
from extrema.train import trackers
from tests.stage_runs import TINY_EXPERIMENT, merge

LOGGING = {"tensorboard": True, "wandb": {"project": "extrema-test", "mode": "offline", "tags": ["t"]}}
STEPS = 16


def write_run(run_dir: Path) -> RunSpec:
    """A pretrain stage with both trackers on, checkpointed every 4 steps."""
    exp = Experiment.model_validate(merge(TINY_EXPERIMENT, {"pretrain": {"steps": STEPS, "ckpt_every": 4}}))
    spec = RunSpec.model_validate(
        {"sweep": "t", "run_id": "r0", "stage": "pretrain", "experiment": exp.model_dump(), "logging": LOGGING}
    )
    rundir.write_json(str(run_dir / "pretrain" / "spec.json"), spec.model_dump(mode="json"))
    return spec


def start(run_dir: Path) -> subprocess.Popen[bytes]:
    """The stage in a process of its own (W&B writes offline files under the stage directory)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "WANDB_DIR": str(run_dir)}
    cmd = [sys.executable, "-m", "extrema.entry", str(run_dir), "pretrain"]
    return subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE)


def logged_losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from metrics.jsonl."""
    rows = rundir.read_jsonl(str(run_dir / "pretrain" / "metrics.jsonl"))
    return {int(r["step"]): float(r["loss"]) for r in rows if "loss" in r}


def tensorboard_scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a scalar as TensorBoard reads the stage's event files (orphaned events purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "pretrain" / contract.TENSORBOARD), purge_orphaned_data=True)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


WANDB_HEADER = 7  # ":W&B", a 2-byte magic, a 1-byte version
BLOCK = 32768  # the run file is a LevelDB-style log: 32 KiB blocks of records with 7-byte headers


def wandb_records(path: Path) -> list[bytes]:
    """The records of an offline W&B run file (LevelDB log framing: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    out, pending, pos = [], b"", WANDB_HEADER
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            out.append(pending)
    return out


def wandb_history(run_dir: Path) -> list[dict[str, Any]]:
    """The history rows of every offline W&B run file under the stage directory, in write order, parsed with
    W&B's own record type."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted((run_dir / "pretrain").rglob("*.wandb")):
        for data in wandb_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def test_both_trackers_hold_every_step_once_after_a_kill_and_resume(tmp_path: Path) -> None:
    spec = write_run(tmp_path)
    proc = start(tmp_path)
    deadline = time.monotonic() + 180
    while max(logged_losses(tmp_path), default=0) < 6:  # past the checkpoint at step 4
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "pretrain" / "tensorboard").is_dir()
    again = start(tmp_path)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()[-3000:]

    losses = logged_losses(tmp_path)
    assert sorted(losses) == list(range(1, STEPS + 1))
    board = tensorboard_scalars(tmp_path, "loss")
    assert [s for s, _ in board] == list(range(1, STEPS + 1))  # each step once, the killed attempt's tail purged
    assert [v for _, v in board] == pytest.approx([losses[s] for s in range(1, STEPS + 1)], rel=1e-6)
    for tag in ("lr", "momentum", "images_per_s"):
        assert len(tensorboard_scalars(tmp_path, tag)) == STEPS

    runs = sorted(p.name for p in (tmp_path / "pretrain").rglob("offline-run-*"))
    assert runs and all(name.endswith(trackers.wandb_id(spec)) for name in runs)  # one W&B run, resumed
    history = wandb_history(tmp_path)
    steps = [int(row["_step"]) for row in history]
    assert sorted(set(steps)) == list(range(1, STEPS + 1))
    last = {int(row["_step"]): row["loss"] for row in history}
    assert [last[s] for s in range(1, STEPS + 1)] == pytest.approx([losses[s] for s in range(1, STEPS + 1)])


def free_port() -> int:
    """A localhost port nothing listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def failing_tracker_run(tmp_path: Path, logging: dict[str, Any], env: dict[str, str]) -> tuple[int, str, Path]:
    """A short pretrain stage with the given trackers in a process of its own: (exit code, stderr, run dir)."""
    exp = Experiment.model_validate(merge(TINY_EXPERIMENT, {"pretrain": {"steps": 4, "ckpt_every": 2}}))
    spec = RunSpec.model_validate(
        {"sweep": "t", "run_id": "r0", "stage": "pretrain", "experiment": exp.model_dump(), "logging": logging}
    )
    rundir.write_json(str(tmp_path / "pretrain" / "spec.json"), spec.model_dump(mode="json"))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path), **env}
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        if var not in env:
            full_env.pop(var, None)
    cmd = [sys.executable, "-m", "extrema.entry", str(tmp_path), "pretrain"]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stderr, tmp_path


def assert_trained_without(tracker: str, code: int, stderr: str, run_dir: Path) -> None:
    """The stage completed, every step is in metrics.jsonl, one warning named the tracker, status notes it."""
    assert code == 0, stderr[-3000:]
    assert sorted(logged_losses(run_dir)) == [1, 2, 3, 4]
    assert stderr.count(f"extrema.train.trackers: {tracker} disabled for this attempt") == 1, stderr[-3000:]
    status = json.loads((run_dir / "pretrain" / "status.json").read_text())
    assert status["state"] == "completed"
    assert status["trackers"][tracker].startswith("disabled: "), status


def test_a_tensorboard_directory_that_cannot_be_made_does_not_stop_the_stage(tmp_path: Path) -> None:
    (tmp_path / "pretrain").mkdir(parents=True)
    (tmp_path / "pretrain" / contract.TENSORBOARD).write_text("a file where the event directory goes")
    code, err, run = failing_tracker_run(tmp_path, {"tensorboard": True}, {})
    assert_trained_without("tensorboard", code, err, run)


def test_wandb_online_without_an_api_key_does_not_stop_the_stage(tmp_path: Path) -> None:
    logging = {"wandb": {"project": "p", "mode": "online"}}
    code, err, run = failing_tracker_run(tmp_path, logging, {"WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"})
    assert_trained_without("wandb", code, err, run)


# wandb.init against a server that refuses connections retries its first request (the run's resume status) until
# the init timeout: 60 s (trackers.WANDB_INIT_TIMEOUT_S, passed to wandb.init, which outranks WANDB_INIT_TIMEOUT),
# plus 2 x 5 s looking up the user for the "logged in as" line. Here it gives up after two refused attempts instead
# (WANDB__GRAPHQL_RETRY_MAX, the wandb-core setting x_graphql_retry_max) and prints no login line (WANDB_SILENT):
# wandb.init still reaches the unreachable server and raises the same CommError, which the stage must survive.
UNREACHABLE_WANDB_FAST = {
    "WANDB_INIT_TIMEOUT": "5",
    "WANDB__GRAPHQL_RETRY_MAX": "1",
    "WANDB__GRAPHQL_RETRY_WAIT_MAX_SECONDS": "1",
    "WANDB_SILENT": "true",
}


def test_an_unreachable_wandb_server_does_not_stop_the_stage(tmp_path: Path) -> None:
    logging = {"tensorboard": True, "wandb": {"project": "p", "mode": "online"}}
    env = {"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}", **UNREACHABLE_WANDB_FAST}
    code, err, run = failing_tracker_run(tmp_path, logging, env)
    assert_trained_without("wandb", code, err, run)
    assert [s for s, _ in tensorboard_scalars(run, "loss")] == [1, 2, 3, 4]  # the other tracker carried on
