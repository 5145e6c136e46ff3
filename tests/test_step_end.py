"""The end of step every training stage shares: cadence, retention, and the loop state across a restart."""

from pathlib import Path

import pytest
import torch

from extrema.run import rundir
from extrema.run.contract import Preempted
from extrema.train import ckpt
from extrema.train.dist import Preemption, World
from extrema.train.step_end import Cadence, LoopState, StepEnd

WORLD = World(0, 1, 0, torch.device("cpu"))
LOSSES = [0.5 + 0.1 * i for i in range(12)]  # the loss of step i + 1


def step_end(stage: Path, cadence: Cadence) -> StepEnd:
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    evaluations = iter(range(100))
    return StepEnd(
        world=WORLD,
        stage_dir=str(stage),
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        loop=LoopState(("loss",), ("last_score",)),
        steps_per_epoch=4,
        total_steps=len(LOSSES),
        cadence=cadence,
        evaluate=lambda: {"score": float(next(evaluations))},
        record=lambda loop, epoch, scores: loop.values.update(last_score=scores["score"]),
    )


def run(stage: Path, cadence: Cadence, stop_after: int | None = None) -> StepEnd:
    """Steps from the stage's checkpoint to the end (or a preemption after `stop_after`)."""
    end = step_end(stage, cadence)
    start = end.resume()
    running = torch.zeros(())
    with Preemption() as preemption:
        for step in range(start, len(LOSSES)):
            running += LOSSES[step]
            preemption.flag = step + 1 == stop_after
            end(step + 1, running, preemption, lr=0.1)
    return end


def records(stage: Path) -> list[dict[str, float]]:
    return rundir.read_jsonl(str(stage / "metrics.jsonl"))


def test_cadence_logs_evaluates_saves_and_keeps_what_the_spec_says(tmp_path: Path) -> None:
    cadence = Cadence(log_every=3, eval_every=5, ckpt_every=2, epochs=False, keep_last=2, keep_every=4)
    run(tmp_path, cadence)
    rows = records(tmp_path)
    assert [r["step"] for r in rows if "loss" in r] == [3, 5, 6, 9, 10, 12]  # every 3, each evaluation, the end
    assert [(r["step"], r["score"]) for r in rows if "score" in r] == [(5, 0.0), (10, 1.0), (12, 2.0)]
    assert rows[0]["loss"] == pytest.approx(sum(LOSSES[:3]) / 3) and rows[0]["total_steps"] == 12
    assert rows[1]["loss"] == pytest.approx(sum(LOSSES[3:5]) / 2)
    assert ckpt.complete_steps(str(tmp_path / "ckpt")) == [12, 10, 8, 4]  # the last two, and multiples of 4


def test_a_restart_continues_the_partial_loss_sums_and_the_numbers(tmp_path: Path) -> None:
    """Preempted at step 7 (saved there, mid log window): the resumed run logs what the uninterrupted one did."""
    cadence = Cadence(log_every=4, ckpt_every=100, epochs=False, eval_every=6, keep_last=5)
    run(tmp_path / "whole", cadence)
    with pytest.raises(Preempted, match="preempted at step 7"):
        run(tmp_path / "cut", cadence, stop_after=7)
    assert ckpt.complete_steps(str(tmp_path / "cut" / "ckpt")) == [7]
    restored = step_end(tmp_path / "cut", cadence)
    assert restored.resume() == 7
    loop = restored.loop
    assert loop.values == {"last_score": 0.0} and loop.loss_steps == 1  # evaluated and logged at 6; 7 not logged
    assert loop.sums["loss"] == pytest.approx(LOSSES[6])
    run(tmp_path / "cut", cadence)
    whole, cut = records(tmp_path / "whole"), records(tmp_path / "cut")
    assert [r["step"] for r in cut] == [r["step"] for r in whole] == [4, 6, 8, 12]
    # Step 8's loss covers steps 7-8 across the restart (the running sum was folded at 7: float32 vs float64 order).
    assert [r.get("loss") for r in cut] == pytest.approx([r.get("loss") for r in whole], rel=1e-6)


def test_each_ranks_random_state_comes_back_and_a_grown_world_keeps_its_checkpoint(tmp_path: Path) -> None:
    """Same world size: the saved RNG state is restored. More ranks than were saved (rank 1 of 2 resuming a
    one-process run): the checkpoint still loads (never set aside) and the new rank keeps its seeded state."""
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    saved = LoopState(rng=WORLD)
    saved.step = 3
    torch.manual_seed(123)
    ckpt.save(str(tmp_path / "ckpt"), 3, ckpt.training_state(model, optimizer, saved))
    expected = torch.rand(4)  # what the run would draw next

    def resumed(world: World) -> StepEnd:
        end = StepEnd(
            world=world,
            stage_dir=str(tmp_path),
            module=model,
            optimizer=optimizer,
            loop=LoopState(rng=world),
            steps_per_epoch=4,
            total_steps=8,
            cadence=Cadence(),
        )
        torch.manual_seed(7)
        assert end.resume() == 3
        return end

    resumed(WORLD)
    assert torch.equal(torch.rand(4), expected)
    grown = resumed(World(1, 2, 1, torch.device("cpu")))
    assert grown.loop.saved_world_size == 1 and ckpt.complete_steps(str(tmp_path / "ckpt")) == [3]
    torch.manual_seed(7)
    seeded = torch.rand(4)
    resumed(World(1, 2, 1, torch.device("cpu")))
    assert torch.equal(torch.rand(4), seeded) and not (tmp_path / "ckpt" / ckpt.CORRUPT_DIR).exists()
