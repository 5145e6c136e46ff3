"""The end of every training step, for every training stage (pretrain, probe, finetune, detect).

After each optimizer step `StepEnd` folds the running losses into the checkpointed loop state when a log line or a
checkpoint is due, evaluates when due, logs, saves (in the background when asked) and prunes checkpoints, and
stops cleanly when preempted. `LoopState` is what the loop itself carries across a restart: it travels in the
checkpoint as a DCP `Stateful`, so a resumed stage continues its step count, its partial loss sums, its
evaluation numbers and (for pretrain) each rank's random state.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from extrema.run import contract, metrics_log
from extrema.run import rank_progress as phases
from extrema.run.attempt import BARE, Attempt
from extrema.run.contract import Preempted
from extrema.train import ckpt, watchdog
from extrema.train.dist import PREEMPT_CHECK_EVERY, Preemption, World, all_reduce_mean, broadcast_buffers

UNSET = -1.0  # an evaluation number not taken yet (every number the stages record is >= 0)
SKIPPED = "skipped_steps"  # the loop value counting the optimizer steps skipped for non-finite numbers


class Diverged(RuntimeError):
    """Training produced a non-finite loss, gradient or parameter: the stage fails, its last checkpoint is finite."""


def local_tensor(t: Tensor) -> Tensor:
    """A tensor's local part (a DTensor's shard; a plain tensor itself)."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def all_finite(tensors: Iterable[Tensor], device: torch.device) -> Tensor:
    """A 0-d bool tensor on `device`: every element of every tensor is finite (no host sync)."""
    parts = [local_tensor(t).detach() for t in tensors]
    parts = [t for t in parts if t.numel()]
    if not parts:
        return torch.ones((), dtype=torch.bool, device=device)
    norms = torch._foreach_norm([t.float() for t in parts])  # one pass; a NaN or inf anywhere makes its norm so
    return torch.isfinite(torch.stack(norms)).all().to(device)


def everywhere(flag: Tensor) -> bool:
    """Whether a bool flag holds on every rank (a MIN all-reduce when distributed; one host sync)."""
    t = flag.to(torch.float32).reshape(1)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


class LoopState:
    """The step, each loss part's sum (and the steps it covers) since the last log line, and named numbers.

    `values` names the numbers the stage keeps (evaluations, best scores, pretrain's initial kNN), each UNSET
    until given. With `rng`, each rank's random state is kept too and restored when the world size is the same
    (`restore_rng`, after the rest: a world that grew finds no state for its new ranks and keeps their seeded one).
    DCP restores the keys the template has, so every key exists from the start (flat scalars and tensors only).
    """

    def __init__(self, losses: Iterable[str] = ("loss",), values: Iterable[str] = (), rng: World | None = None) -> None:
        self.step = 0
        self.loss_steps = 0
        self.sums = dict.fromkeys(losses, 0.0)
        self.values = dict.fromkeys(values, UNSET)
        self.rng = rng
        self.saved_world_size: int | None = None
        self.restoring = False  # a restore's template leaves the RNG out: the saved world may have had fewer ranks

    def state_dict(self) -> dict[str, Any]:
        """The checkpointed form."""
        out: dict[str, Any] = {"step": self.step, "loss_steps": self.loss_steps}
        out.update({f"{name}_sum": v for name, v in self.sums.items()})
        out.update(self.values)
        if self.rng is not None:
            out["world_size"] = self.rng.size
            if not self.restoring:
                out[self.rng_key] = rng_state(self.rng.device)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take the checkpointed form back."""
        self.step, self.loss_steps = int(state["step"]), int(state["loss_steps"])
        self.sums = {name: float(state[f"{name}_sum"]) for name in self.sums}
        self.values = {name: float(state[name]) for name in self.values}
        if self.rng is not None:
            self.saved_world_size = int(state["world_size"])

    @property
    def rng_key(self) -> str:
        """This rank's RNG entry in the checkpoint."""
        assert self.rng is not None
        return f"rng_rank{self.rng.rank}"

    def restore_rng(self, step_url: str) -> None:
        """After a restore from `step_url`: take this rank's RNG state back when the world has the same size (each
        rank saved its own), else keep the seeded one. Collective: every rank takes the same decision."""
        if self.rng is None or self.saved_world_size != self.rng.size:
            return
        state = {"extra": {self.rng_key: rng_state(self.rng.device)}}
        ckpt.load(step_url, state)
        set_rng_state(state["extra"][self.rng_key], self.rng.device)

    def given(self, *names: str) -> dict[str, float]:
        """The named values that are set."""
        return {n: self.values[n] for n in names if self.values[n] != UNSET}


def rng_state(device: torch.device) -> dict[str, Tensor]:
    """RNG states a training step consumes (drop path): CPU, and CUDA when used."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


ACCURACY = ("top1", "top5")


def accuracy_values() -> tuple[str, ...]:
    """The values a classifier stage keeps: last and best top-1/top-5 and the epoch of the best top-1."""
    return (*(f"last_{k}" for k in ACCURACY), *(f"best_{k}" for k in ACCURACY), "best_epoch")


def keep_accuracy(loop: LoopState, epoch: float, scores: dict[str, float]) -> None:
    """Record an evaluation as the last one, and keep the best top-1 (with its epoch) and the best top-5."""
    v = loop.values
    v["last_top1"], v["last_top5"] = scores["top1"], scores["top5"]
    if scores["top1"] > v["best_top1"]:
        v["best_top1"], v["best_epoch"] = scores["top1"], epoch
    v["best_top5"] = max(v["best_top5"], scores["top5"])


def keep_scores(loop: LoopState, epoch: float, scores: dict[str, float]) -> None:
    """Record an evaluation's numbers under their own names (the result reports the final one)."""
    loop.values.update(scores)


def accuracy_outcome(name: str, loop: LoopState) -> dict[str, float]:
    """A classifier stage's result metrics: last and best top-1/top-5, and the epoch of the best top-1."""
    return {f"{name}_{k.removeprefix('last_')}": loop.values[k] for k in accuracy_values()}


@dataclass(frozen=True)
class Cadence:
    """When the end of a step logs, evaluates and saves: every N steps (None: not by count), at every epoch end
    (`epochs`: log and save, and evaluate unless `eval_every` is set), and at the last step."""

    log_every: int | None = None
    eval_every: int | None = None
    ckpt_every: int | None = None
    epochs: bool = True
    eval_last: bool = True  # evaluate after the last step (pretrain evaluates after exporting instead)
    log_evaluations: bool = True  # an evaluation also writes the loss so far (else its own line)
    keep_last: int = 2
    keep_every: int | None = None
    background: bool = False  # save in the background, except at the last step and when stopping


Evaluate = Callable[[], dict[str, float]]
Record = Callable[[LoopState, float, dict[str, float]], None]


@dataclass(kw_only=True)
class StepEnd:
    """What every training loop does after each optimizer step. Build it, then `resume()` before the loop."""

    world: World
    stage_dir: str
    module: nn.Module  # the unwrapped model: checkpointed, and in eval mode while evaluated
    optimizer: torch.optim.Optimizer
    loop: LoopState
    steps_per_epoch: int
    total_steps: int
    cadence: Cadence
    evaluate: Evaluate | None = None
    record: Record = keep_scores
    attempt: Attempt = BARE  # the job entry's: fences checkpoint commits, receives the metrics (trackers)
    on_nonfinite: str = "fail"  # the stage spec's on_nonfinite: fail | skip
    max_skipped_steps: int = 0
    metrics: metrics_log.MetricsLog = field(init=False)
    saver: ckpt.Saver = field(init=False)
    first_bad: Tensor = field(init=False)  # the first step whose running loss was not finite, on the device; -1

    def __post_init__(self) -> None:
        self.saver = ckpt.Saver(contract.StageDir(self.stage_dir).checkpoints, self.attempt.fence)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=self.world.device)
        if self.on_nonfinite == "skip":
            self.loop.values.setdefault(SKIPPED, 0.0)
        # The watchdog's phases (attribute writes): forward/backward from the model's forward to the optimizer step.
        self.module.register_forward_pre_hook(self._computing)
        self.optimizer.register_step_pre_hook(self._stepping)

    @staticmethod
    def _computing(*_: object) -> None:
        dog = watchdog.active()
        if dog.phase == phases.LOADING:
            dog.set_phase(phases.COMPUTE)

    @staticmethod
    def _stepping(*_: object) -> None:
        dog = watchdog.active()
        if dog.phase == phases.COMPUTE:
            dog.set_phase(phases.SYNC)

    def update_allowed(self, step: int, loss: Tensor, parameters: Iterable[Tensor]) -> bool:
        """Whether optimizer step `step` (1-based) may apply these gradients. `fail`: always, with no sync (a
        divergence is caught at the next log or checkpoint step, before anything is saved). `skip`: only when the
        loss and every gradient are finite on every rank (one host sync); a skipped step is counted and logged,
        and more than `max_skipped_steps` of them end the stage as diverged."""
        if self.on_nonfinite != "skip":
            return True
        grads = [p.grad for p in parameters if p.grad is not None]
        finite = all_finite([loss.reshape(-1), *grads], self.world.device)
        if everywhere(finite):
            return True
        skipped = int(self.loop.values[SKIPPED]) + 1
        self.loop.values[SKIPPED] = float(skipped)
        print(f"extrema: step {step}: non-finite loss or gradient; step skipped ({skipped} of at most "
              f"{self.max_skipped_steps})", file=sys.stderr, flush=True)  # fmt: skip
        if skipped > self.max_skipped_steps:
            self.diverge(step, f"{skipped} non-finite steps skipped, more than max_skipped_steps")
        return False

    def optimizer_step(
        self, done: int, loss: Tensor, parameters: Iterable[Tensor], clip_grad: float | None = None
    ) -> bool:
        """After the backward pass of step `done` (1-based): clip the gradients to norm `clip_grad` when set, step the
        optimizer unless `update_allowed` refuses, and zero the gradients; whether the step was applied."""
        params = list(parameters)
        if clip_grad is not None:
            nn.utils.clip_grad_norm_(params, clip_grad)
        applied = self.update_allowed(done, loss, params)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def progress(self) -> dict[str, float]:
        """The steps taken and the epochs they make, for a training stage's result."""
        return {"steps": self.loop.step, "epochs": self.loop.step / self.steps_per_epoch}

    def diverge(self, step: int, what: str) -> None:
        """End the stage as diverged at `step`: wait for a checkpoint still being written (it holds the last
        finite state), then raise Diverged."""
        self.saver.wait()
        raise Diverged(f"diverged at step {step} ({what})")

    def check_finite(self, done: int, losses: list[float]) -> None:
        """At a log or checkpoint step: Diverged when a logged loss or (at log steps) a parameter is not finite."""
        if all(math.isfinite(v) for v in losses) and everywhere(
            all_finite(self.module.parameters(), self.world.device)
        ):
            return
        first = self.first_bad.clone().reshape(1)
        if dist.is_initialized():
            first[first < 0] = done
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        step = int(first.item()) if first.item() >= 0 else done
        bad = next((v for v in losses if not math.isfinite(v)), None)
        self.diverge(step, f"loss {bad}" if bad is not None else "a parameter is not finite")

    def resume(self) -> int:
        """Restore the newest complete checkpoint into module, optimizer and loop state (nothing when there is
        none), open the metrics log without the records past that step, and return the steps already taken."""
        watchdog.active().set_phase(phases.STARTING)
        self.loop.restoring = True
        try:
            restored = ckpt.restore(self.saver.ckpt_dir, self.module, self.optimizer, self.loop, self.attempt.fence)
        finally:
            self.loop.restoring = False
        if restored is not None:
            self.loop.restore_rng(ckpt.step_url(self.saver.ckpt_dir, self.loop.step))
        self.metrics = metrics_log.MetricsLog(
            contract.StageDir(self.stage_dir).metrics, keep_after_step=self.loop.step, mirror=self.attempt.mirror
        )
        watchdog.active().resumed(self.loop.step)
        watchdog.active().set_phase(phases.LOADING)
        return self.loop.step

    def log(self, row: dict[str, Any]) -> None:
        """Write one metrics line (rank 0)."""
        if self.world.is_main:
            self.metrics.log(row, flush=True)

    def __call__(self, done: int, running: Tensor, preemption: Preemption, **row: float) -> None:
        """Bookkeeping after step `done` (1-based); `row` adds to its log line (lr, ...). Raises Preempted after
        saving when asked to stop."""
        c, loop = self.cadence, self.loop
        dog = watchdog.active()
        dog.finished(done)
        dog.set_phase(phases.SYNC)
        epoch = done / self.steps_per_epoch
        last = done == self.total_steps
        epoch_end = c.epochs and (done % self.steps_per_epoch == 0 or last)
        every = c.eval_every
        due = self.evaluate is not None and (
            (last and c.eval_last)
            or bool(every and done % every == 0 and (c.eval_last or not last))
            or (every is None and epoch_end)
        )
        bad = ~torch.isfinite(running).all()
        self.first_bad = torch.where(bad & (self.first_bad < 0), done, self.first_bad)
        check = self.world.size == 1 or done % PREEMPT_CHECK_EVERY == 0
        stop = check and preemption.should_stop(self.world.device)
        save = last or epoch_end or stop or bool(c.ckpt_every and done % c.ckpt_every == 0) or (due and c.epochs)
        log = last or epoch_end or bool(c.log_every and done % c.log_every == 0) or (due and c.log_evaluations)
        if save or log:
            reduced = all_reduce_mean(running).reshape(-1).tolist()
            self.check_finite(done, reduced)  # before anything is logged or saved
            for name, value in zip(loop.sums, reduced):
                loop.sums[name] += value
            loop.loss_steps += done - loop.step
            loop.step = done
            running.zero_()
        scores: dict[str, float] = {}
        if due:
            assert self.evaluate is not None
            dog.set_phase(phases.EVALUATING)
            broadcast_buffers(self.module)  # every rank evaluates the model that is checkpointed (rank 0's)
            self.module.eval()
            scores = self.evaluate()
            self.module.train()
            self.record(loop, epoch, scores)
        head = {"step": done, "total_steps": self.total_steps, "epoch": epoch}
        if log:
            parts = {name: s / max(loop.loss_steps, 1) for name, s in loop.sums.items()}
            loop.sums = dict.fromkeys(loop.sums, 0.0)
            loop.loss_steps = 0
            shown = parts if len(parts) > 1 else {}
            skips = {SKIPPED: int(loop.values[SKIPPED])} if SKIPPED in loop.values else {}
            self.log({**head, "loss": sum(parts.values()), **row, **shown, **skips, **scores})
        elif scores:
            self.log({**head, **scores})
        if save:
            dog.set_phase(phases.SAVING)
            background = c.background and not (last or stop)
            self.saver.save(done, ckpt.training_state(self.module, self.optimizer, loop), background=background)
            ckpt.apply_retention(self.saver.ckpt_dir, c.keep_last, c.keep_every)
        if stop:
            self.saver.wait()
            raise Preempted(f"preempted at step {done}; checkpoint saved")
        if last:
            self.saver.wait()
        dog.set_phase(phases.FINISHING if last else phases.LOADING)
