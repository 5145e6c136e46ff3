"""Training that goes wrong ends as `failed`, named, with its last checkpoint finite: a non-finite loss, gradient or
parameter (`on_nonfinite: fail`, checked at log and checkpoint steps), or more skipped steps than allowed
(`on_nonfinite: skip`); a downstream stage never runs on a diverged pretraining."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from extrema import entry
from extrema.run import contract, rundir
from extrema.train import ckpt
from extrema.train.dist import Preemption, World
from extrema.train.safe_dcp import SafeFsspecReader
from extrema.train.step_end import SKIPPED, Cadence, Diverged, LoopState, StepEnd
from launch.runstore import store
from tests.cluster_sweeps import cli
from tests.stage_runs import TINY_EXPERIMENT, make_run

WORLD = World(0, 1, 0, torch.device("cpu"))
DIVERGING = {"pretrain": {"base_lr": 1e30, "steps": 8, "log_every": 2, "ckpt_every": 1, "keep_last": 20}}


def finite_checkpoints(stage: Path) -> list[int]:
    """The complete checkpoint steps, each asserted to hold only finite model tensors."""
    steps = ckpt.complete_steps(str(stage / "ckpt"))
    for step in steps:
        url = ckpt.step_url(str(stage / "ckpt"), step)
        meta = SafeFsspecReader(url).read_metadata().state_dict_metadata
        want = {
            k: torch.empty(m.size, dtype=m.properties.dtype)  # type: ignore[union-attr]
            for k, m in meta.items()
            if k.startswith("model.")
        }
        ckpt.load(url, want)
        assert all(torch.isfinite(t).all() for t in want.values()), f"step {step} holds a non-finite tensor"
    return steps


def test_a_diverging_pretraining_fails_naming_the_step_and_keeps_its_finite_checkpoints(tmp_path: Path) -> None:
    make_run(str(tmp_path), DIVERGING)
    assert entry.main([str(tmp_path), "pretrain"]) == contract.EXIT_FAILED
    status = contract.read_status(str(tmp_path / "pretrain"))
    assert status["state"] == "failed", status
    error = str(status["error"])
    assert re.search(r"Diverged: diverged at step (\d+) \((loss (nan|inf)|a parameter is not finite)\)", error), error
    step = int(re.search(r"at step (\d+)", error).group(1))  # type: ignore[union-attr]
    saved = finite_checkpoints(tmp_path / "pretrain")
    assert saved and max(saved) < step <= 8, (saved, step)  # nothing saved from the diverged step on
    assert not (tmp_path / "pretrain" / "result.json").exists()
    logged = [r for r in rundir.read_jsonl(str(tmp_path / "pretrain" / "metrics.jsonl")) if "loss" in r]
    assert all(r["step"] < step for r in logged)  # the non-finite loss was never written


def test_the_downstream_of_a_diverged_pretraining_never_runs(tmp_path: Path) -> None:
    doc = {
        "name": "div",
        "root": str(tmp_path / "runs"),
        "base": {**TINY_EXPERIMENT, "stages": ["pretrain", "knn"], **DIVERGING},
        "launcher": {"backend": "local"},
    }
    doc["base"]["pretrain"] = {**TINY_EXPERIMENT["pretrain"], **DIVERGING["pretrain"]}
    path = tmp_path / "div.yaml"
    path.write_text(json.dumps(doc))
    code, out = cli("sweep", str(path))
    assert code != 0, out
    [run] = [p for p in (tmp_path / "runs" / "div").iterdir() if (p / "pretrain").is_dir()]
    assert "diverged at step" in str(store.read_status(str(run / "pretrain")).get("error")), out
    knn = store.read_status(str(run / "knn"))
    assert knn.get("state") != "completed" and not (run / "knn" / "result.json").exists(), knn
    code, out = cli("status", str(path))
    assert "diverged at step" in out, out


def guarded(stage: Path, mode: str, max_skipped: int) -> tuple[StepEnd, torch.nn.Linear, torch.optim.Optimizer]:
    """A StepEnd over a real linear model and SGD, logging every step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    end = StepEnd(
        world=WORLD,
        stage_dir=str(stage),
        module=model,
        optimizer=optimizer,
        loop=LoopState(),
        steps_per_epoch=10,
        total_steps=10,
        cadence=Cadence(log_every=1, ckpt_every=1, epochs=False, keep_last=20),
        on_nonfinite=mode,
        max_skipped_steps=max_skipped,
    )
    end.resume()
    return end, model, optimizer


def one_step(end: StepEnd, model: torch.nn.Linear, opt: torch.optim.Optimizer, step: int, x: torch.Tensor) -> None:
    """A training step as the stages write it: backward, the guard, the update, the end of step."""
    loss = model(x).square().mean()
    loss.backward()
    running = torch.zeros(())
    if end.update_allowed(step, loss.detach(), model.parameters()):
        opt.step()
        running += loss.detach()
    opt.zero_grad(set_to_none=True)
    with Preemption() as preemption:
        end(step, running, preemption)


def test_skip_mode_skips_non_finite_steps_then_fails_past_the_bound(tmp_path: Path) -> None:
    end, model, opt = guarded(tmp_path, "skip", max_skipped=1)
    good, bad = torch.ones(4, 2), torch.full((4, 2), float("inf"))
    one_step(end, model, opt, 1, good)
    before = [p.detach().clone() for p in model.parameters()]
    one_step(end, model, opt, 2, bad)  # skipped: the weights stay, the log says so
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    one_step(end, model, opt, 3, good)
    rows = rundir.read_jsonl(str(tmp_path / "metrics.jsonl"))
    assert [r[SKIPPED] for r in rows] == [0, 1, 1] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    with pytest.raises(Diverged, match="diverged at step 4 \\(2 non-finite steps skipped"):
        one_step(end, model, opt, 4, bad)
    assert finite_checkpoints(tmp_path) == [3, 2, 1]


def test_fail_mode_raises_at_the_next_log_step_before_saving(tmp_path: Path) -> None:
    end, model, opt = guarded(tmp_path, "fail", max_skipped=0)
    one_step(end, model, opt, 1, torch.ones(4, 2))
    with pytest.raises(Diverged, match=r"diverged at step 2 \(loss (inf|nan)\)"):
        one_step(end, model, opt, 2, torch.full((4, 2), float("inf")))
    assert finite_checkpoints(tmp_path) == [1]
