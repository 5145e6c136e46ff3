"""End-of-step bookkeeping shared by the supervised stages (probe, finetune).

After every optimizer step: fold the running loss into the checkpointed totals when a checkpoint is due,
evaluate and log at epoch ends, save and prune checkpoints, and stop cleanly when preempted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from extrema import ckpt, rundir
from extrema.dist import PREEMPT_CHECK_EVERY, Preemption, World, all_reduce_mean
from extrema.entry import Preempted


@dataclass
class StepEnd:
    """What the supervised loops do after each optimizer step; `extra` is the checkpointed loop state."""

    world: World
    metrics: rundir.MetricsLog
    ckpt_dir: str
    steps_per_epoch: int
    total_steps: int
    ckpt_every: int | None
    module: nn.Module  # the unwrapped model: checkpointed, and switched to eval mode for evaluation
    optimizer: torch.optim.Optimizer
    evaluate: Callable[[], dict[str, float]]
    extra: dict[str, Any]

    @classmethod
    def resume(
        cls,
        world: World,
        stage_dir: str,
        steps_per_epoch: int,
        total_steps: int,
        ckpt_every: int | None,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        evaluate: Callable[[], dict[str, float]],
    ) -> StepEnd:
        """Restore the stage's newest complete checkpoint into module and optimizer (or start fresh), and open its
        metrics log without the records past that step."""
        ckpt_dir = rundir.join(stage_dir, "ckpt")
        extra = ckpt.restore(ckpt_dir, module, optimizer, fresh_extra()) or fresh_extra()
        metrics = rundir.MetricsLog(rundir.join(stage_dir, "metrics.jsonl"), keep_after_step=int(extra["step"]))
        return cls(
            world, metrics, ckpt_dir, steps_per_epoch, total_steps, ckpt_every, module, optimizer, evaluate, extra
        )

    @property
    def start_step(self) -> int:
        """The number of optimizer steps already taken (restored from the checkpoint)."""
        return int(self.extra["step"])

    def __call__(self, done: int, lr: float, running: Tensor, preemption: Preemption) -> None:
        """Bookkeeping after step `done` (1-based); raises Preempted after saving when asked to stop."""
        extra = self.extra
        epoch_end = done % self.steps_per_epoch == 0 or done == self.total_steps
        check = self.world.size == 1 or done % PREEMPT_CHECK_EVERY == 0
        stop = check and preemption.should_stop(self.world.device)
        save = epoch_end or stop or bool(self.ckpt_every and done % self.ckpt_every == 0)
        if save:
            extra["loss_sum"] += all_reduce_mean(running).item()
            extra["loss_steps"] += done - extra["step"]
            extra["step"] = done
            running.zero_()
        if epoch_end:
            self.module.eval()
            acc = self.evaluate()
            self.module.train()
            epoch = done / self.steps_per_epoch
            track(extra, epoch, acc)
            train_loss = extra["loss_sum"] / max(extra["loss_steps"], 1)
            extra["loss_sum"], extra["loss_steps"] = 0.0, 0
            if self.world.is_main:
                self.metrics.log({"step": done, "epoch": epoch, "loss": train_loss, "lr": lr, **acc}, flush=True)
        if save:
            ckpt.save(self.ckpt_dir, done, ckpt.training_state(self.module, self.optimizer, extra))
            ckpt.apply_retention(self.ckpt_dir, keep_last=2)
        if stop:
            raise Preempted(f"preempted at step {done}; checkpoint saved")


def fresh_extra() -> dict[str, Any]:
    """Checkpointed loop state: the step, the loss since the last evaluation, last and best accuracy.

    Flat scalars only: DCP restores the keys the template has, so a nested dict would come back empty.
    """
    extra: dict[str, Any] = {"step": 0, "loss_sum": 0.0, "loss_steps": 0}
    extra.update({k: -1.0 for k in ("last_top1", "last_top5", "best_top1", "best_top5", "best_epoch")})
    return extra


def track(extra: dict[str, Any], epoch: float, acc: dict[str, float]) -> None:
    """Record the last evaluation in `extra` and keep the best top-1 (with its epoch) and the best top-5."""
    extra["last_top1"], extra["last_top5"] = acc["top1"], acc["top5"]
    if acc["top1"] > extra["best_top1"]:
        extra["best_top1"], extra["best_epoch"] = acc["top1"], epoch
    extra["best_top5"] = max(extra["best_top5"], acc["top5"])


def outcome(name: str, extra: dict[str, Any]) -> dict[str, float]:
    """The result metrics of a stage: last and best top-1/top-5, and the epoch of the best top-1."""
    keys = ("last_top1", "last_top5", "best_top1", "best_top5", "best_epoch")
    return {f"{name}_{k.removeprefix('last_')}": float(extra[k]) for k in keys}
