"""End-of-step bookkeeping shared by the supervised stages (probe, finetune, detect).

After every optimizer step: fold the running losses into the checkpointed totals when a log or a checkpoint is
due, evaluate (at epoch ends, or every `eval_every` steps and at the end), log, save and prune checkpoints, and
stop cleanly when preempted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from extrema import ckpt, rundir
from extrema.dist import PREEMPT_CHECK_EVERY, Preemption, World, all_reduce_mean, broadcast_buffers
from extrema.entry import Preempted

Record = Callable[[dict[str, Any], float, dict[str, float]], None]


def loop_state(losses: tuple[str, ...] = ("loss",)) -> dict[str, Any]:
    """The step, and each loss part's sum (with the steps it covers) since the last record."""
    return {"step": 0, "loss_steps": 0, **{f"{name}_sum": 0.0 for name in losses}}


def fresh_extra() -> dict[str, Any]:
    """Checkpointed loop state: the step, the loss since the last evaluation, last and best accuracy.

    Flat scalars only: DCP restores the keys the template has, so a nested dict would come back empty.
    """
    extra = loop_state()
    extra.update({k: -1.0 for k in ("last_top1", "last_top5", "best_top1", "best_top5", "best_epoch")})
    return extra


def track(extra: dict[str, Any], epoch: float, acc: dict[str, float]) -> None:
    """Record the last evaluation in `extra` and keep the best top-1 (with its epoch) and the best top-5."""
    extra["last_top1"], extra["last_top5"] = acc["top1"], acc["top5"]
    if acc["top1"] > extra["best_top1"]:
        extra["best_top1"], extra["best_epoch"] = acc["top1"], epoch
    extra["best_top5"] = max(extra["best_top5"], acc["top5"])


@dataclass
class StepEnd:
    """What the supervised loops do after each optimizer step; `extra` is the checkpointed loop state.

    `running` holds the loss parts named by `losses` summed since the last fold; `record(extra, epoch, scores)`
    keeps an evaluation's scores in `extra`.
    """

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
    record: Record
    losses: tuple[str, ...] = ("loss",)
    eval_every: int | None = None  # steps between evaluations (and at the last step); every epoch end when None
    log_every: int | None = None  # steps between loss records besides epoch ends and evaluations

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
        fresh: Callable[[], dict[str, Any]] = fresh_extra,
        record: Record = track,
        losses: tuple[str, ...] = ("loss",),
        eval_every: int | None = None,
        log_every: int | None = None,
    ) -> StepEnd:
        """Restore the stage's newest complete checkpoint into module and optimizer (or start from `fresh()`, the
        classifiers' state by default), and open its metrics log without the records past that step."""
        ckpt_dir = rundir.join(stage_dir, "ckpt")
        extra = ckpt.restore(ckpt_dir, module, optimizer, fresh()) or fresh()
        metrics = rundir.MetricsLog(rundir.join(stage_dir, "metrics.jsonl"), keep_after_step=int(extra["step"]))
        return cls(
            world,
            metrics,
            ckpt_dir,
            steps_per_epoch,
            total_steps,
            ckpt_every,
            module,
            optimizer,
            evaluate,
            extra,
            record,
            losses,
            eval_every,
            log_every,
        )

    @property
    def start_step(self) -> int:
        """The number of optimizer steps already taken (restored from the checkpoint)."""
        return int(self.extra["step"])

    def __call__(self, done: int, lr: float, running: Tensor, preemption: Preemption) -> None:
        """Bookkeeping after step `done` (1-based); raises Preempted after saving when asked to stop."""
        extra = self.extra
        epoch = done / self.steps_per_epoch
        epoch_end = done % self.steps_per_epoch == 0 or done == self.total_steps
        every = self.eval_every
        due = epoch_end if every is None else done == self.total_steps or done % every == 0
        check = self.world.size == 1 or done % PREEMPT_CHECK_EVERY == 0
        stop = check and preemption.should_stop(self.world.device)
        save = epoch_end or due or stop or bool(self.ckpt_every and done % self.ckpt_every == 0)
        log = epoch_end or due or bool(self.log_every and done % self.log_every == 0)
        if save or log:
            for name, value in zip(self.losses, all_reduce_mean(running).reshape(-1).tolist()):
                extra[f"{name}_sum"] += value
            extra["loss_steps"] += done - extra["step"]
            extra["step"] = done
            running.zero_()
        scores: dict[str, float] = {}
        if due:
            broadcast_buffers(self.module)  # every rank evaluates the model that is checkpointed (rank 0's)
            self.module.eval()
            scores = self.evaluate()
            self.module.train()
            self.record(extra, epoch, scores)
        if log:
            parts = {name: extra[f"{name}_sum"] / max(extra["loss_steps"], 1) for name in self.losses}
            extra.update({f"{name}_sum": 0.0 for name in self.losses})
            extra["loss_steps"] = 0
            if self.world.is_main:
                shown = parts if len(parts) > 1 else {}
                row = {"step": done, "epoch": epoch, "loss": sum(parts.values()), "lr": lr, **shown, **scores}
                self.metrics.log(row, flush=True)
        if save:
            ckpt.save(self.ckpt_dir, done, ckpt.training_state(self.module, self.optimizer, extra))
            ckpt.apply_retention(self.ckpt_dir, keep_last=2)
        if stop:
            raise Preempted(f"preempted at step {done}; checkpoint saved")


def outcome(name: str, extra: dict[str, Any]) -> dict[str, float]:
    """The result metrics of a stage: last and best top-1/top-5, and the epoch of the best top-1."""
    keys = ("last_top1", "last_top5", "best_top1", "best_top5", "best_epoch")
    return {f"{name}_{k.removeprefix('last_')}": float(extra[k]) for k in keys}
