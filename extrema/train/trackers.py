"""Metrics to TensorBoard and Weights & Biases, besides metrics.jsonl, as a stage's `logging` section asks.

`extrema.entry` opens the trackers of the stage it runs on rank 0 (`opened`) and hands them to the stage (as the
`mirror` of its `extrema.run.attempt.Attempt`); every record the stage writes to its metrics log
(`metrics_log.MetricsLog`) is published to them, numbers only, at the record's step. A resumed attempt
continues where its checkpoint is: TensorBoard is told to purge the events past that step (the killed attempt
logged them; this one logs them again), and the W&B run of the stage (its id derived from sweep, run and stage)
is resumed, so steps are never duplicated. Both libraries are optional extras (`pip install 'extrema-ssl[track]'`).

A tracker is never a reason for a stage to stop: one that cannot start (no library, a directory that cannot be
made, no API key, a server that does not answer) or fails later is disabled for the attempt with one warning in
the log and a note in the stage's status record (`trackers`); metrics.jsonl stays complete either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from extrema.run import contract, rundir
from extrema.spec import RunSpec

WANDB_DIR = "wandb"
WANDB_INIT_TIMEOUT_S = 60.0  # how long W&B may take to start a run before it is disabled (WANDB_INIT_TIMEOUT)
Note = Callable[[dict[str, str]], None]  # records {tracker: why it is disabled} (in the stage's status record)


def wandb_id(spec: RunSpec) -> str:
    """The W&B run id of a stage: the same for every attempt, so a resumed attempt continues the same W&B run."""
    return hashlib.sha256(f"{spec.sweep}/{spec.run_id}/{spec.stage}".encode()).hexdigest()[:16]


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of a metrics record (booleans and the step itself left out)."""
    return {
        k: float(v)
        for k, v in record.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
    }


def hyperparameters(spec: RunSpec) -> dict[str, Any]:
    """The resolved experiment as flat dotted keys with plain values (lists as JSON text)."""
    out: dict[str, Any] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif value is not None:
            out[key] = json.dumps(value)

    walk(spec.experiment.model_dump(mode="json"), "")
    return out


class Trackers:
    """The trackers of one stage attempt; opened lazily at the first record, when the resume step is known."""

    def __init__(self, spec: RunSpec, stage_dir: str, note: Note | None = None) -> None:
        self.spec = spec
        self.stage_dir = stage_dir
        self.note = note
        self.resume_step: int | None = None
        self.earlier: list[dict[str, Any]] = []
        self.disabled: dict[str, str] = {}  # tracker -> why
        self._tb: Any = None
        self._tb_local: str | None = None
        self._tb_remote: str | None = None
        self._wandb: Any = None

    def resumed_at(self, step: int | None, earlier: list[dict[str, Any]] | None = None) -> None:
        """The step this attempt continues after (None or 0: from the start) and the records logged up to it."""
        self.resume_step = step or None
        self.earlier = list(earlier or [])

    def disable(self, name: str, e: BaseException) -> None:
        """Stop using one tracker for this attempt: one warning, and a note in the stage's status record."""
        hint = "; install 'extrema-ssl[track]' to log there" if isinstance(e, ImportError) else ""
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        self.disabled[name] = why
        print(f"extrema.train.trackers: {name} disabled for this attempt ({why}){hint}; training goes on",
              file=sys.stderr, flush=True)  # fmt: skip
        if self.note is not None:
            try:
                self.note(dict(self.disabled))
            except Exception as err:  # the note is information: it must not fail the stage either
                print(f"extrema.train.trackers: could not record it: {type(err).__name__}: {err}", file=sys.stderr)

    def guarded(self, name: str, action: Callable[[], None]) -> None:
        """Run one tracker's action; any failure disables that tracker (never the stage)."""
        if name in self.disabled:
            return
        try:
            action()
        except Exception as e:
            self.disable(name, e)

    def _open(self) -> None:
        if self.spec.logging.tensorboard and self._tb is None:
            self.guarded("tensorboard", self._open_tensorboard)
        w = self.spec.logging.wandb
        if w is not None and w.mode != "disabled" and self._wandb is None:
            self.guarded("wandb", self._open_wandb)

    def _open_tensorboard(self) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        target = rundir.join(self.stage_dir, contract.TENSORBOARD)
        local = rundir.local_path(target)
        self._tb_remote = None if local else target  # an object store gets copies of a local directory
        self._tb_local = local or tempfile.mkdtemp(prefix="extrema-tb-")
        purge = self.resume_step + 1 if self.resume_step else None
        self._tb = SummaryWriter(self._tb_local, purge_step=purge)
        if purge is None:
            experiment, start, end = hparams(hyperparameters(self.spec), {})
            for summary in (experiment, start, end):
                self._tb.file_writer.add_summary(summary)
            self._tb.add_text("spec", f"```\n{self.spec.model_dump_json(indent=2)}\n```")

    def _open_wandb(self) -> None:
        w = self.spec.logging.wandb
        if w is None:
            return
        import wandb

        local = rundir.local_path(rundir.join(self.stage_dir, WANDB_DIR))
        os.makedirs(local or tempfile.gettempdir(), exist_ok=True)
        self._wandb = wandb.init(
            project=w.project,
            entity=w.entity,
            mode=w.mode,
            tags=w.tags,
            id=wandb_id(self.spec),
            resume="allow",
            group=f"{self.spec.sweep}/{self.spec.run_id}",
            name=f"{self.spec.run_id}/{self.spec.stage}",
            job_type=self.spec.stage,
            config=self.spec.model_dump(mode="json"),
            dir=local,
            reinit="finish_previous",
            settings=wandb.Settings(init_timeout=contract.env_float("WANDB_INIT_TIMEOUT", WANDB_INIT_TIMEOUT_S)),
        )
        # A W&B run that holds none of the steps before the resume (offline files of a killed attempt are
        # often unflushed; a first online attempt may have never synced) gets them from metrics.jsonl.
        for record in self.earlier:
            step = record.get("step")
            values = scalars(record)
            if isinstance(step, int) and values and step >= int(getattr(self._wandb, "step", 0) or 0):
                self._wandb.log(values, step=step)

    def publish(self, record: dict[str, Any]) -> None:
        """Send a metrics record's numbers to every tracker, at its step."""
        values = scalars(record)
        if not values or "step" not in record:
            return
        self._open()
        step = int(record["step"])
        if self._tb is not None:
            self.guarded("tensorboard", lambda: self._tb_scalars(values, step))
        if self._wandb is not None and step >= int(getattr(self._wandb, "step", 0) or 0):
            # a resumed W&B run holds the steps before its `step` already
            self.guarded("wandb", lambda: self._wandb.log(values, step=step))

    def _tb_scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self._tb.add_scalar(key, value, step)

    def flush(self) -> None:
        """Write what the trackers hold (TensorBoard's event file; object stores get a copy)."""
        if self._tb is not None:
            self.guarded("tensorboard", self._flush_tensorboard)

    def _flush_tensorboard(self) -> None:
        self._tb.flush()
        self._upload()

    def _upload(self) -> None:
        if self._tb_remote is None or self._tb_local is None:
            return
        fs, path = rundir.filesystem(self._tb_remote)
        for name in os.listdir(self._tb_local):
            fs.put_file(os.path.join(self._tb_local, name), f"{path}/{name}")

    def close(self) -> None:
        """Flush and close every tracker."""
        if self._tb is not None:
            self.flush()
            self.guarded("tensorboard", self._tb.close)
            if self._tb_remote is not None and self._tb_local is not None:
                shutil.rmtree(self._tb_local, ignore_errors=True)
            self._tb = None
        if self._wandb is not None:
            self.guarded("wandb", self._wandb.finish)
            self._wandb = None


@contextlib.contextmanager
def opened(spec: RunSpec, stage_dir: str, note: Note | None = None) -> Iterator[Trackers | None]:
    """The stage's trackers for the span of an attempt (None when its spec asks for none); closed at the end, a
    tracker that fails reported once (and to `note`) without stopping the stage."""
    wanted = spec.logging.tensorboard or (spec.logging.wandb is not None and spec.logging.wandb.mode != "disabled")
    if not wanted:
        yield None
        return
    t = Trackers(spec, stage_dir, note)
    try:
        yield t
    finally:
        try:
            t.close()
        except Exception as e:  # a tracker must never turn a finished stage into a failed one
            print(f"extrema.train.trackers: closing failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
