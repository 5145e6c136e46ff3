"""A watchdog thread in every rank: progress records out of band, and a hang found, named and ended.

`python -m extrema.entry` starts one per rank (`started`) once the ranks know each other; the step loop's end
(`extrema.train.step_end`) tells it the steps and phases through `active()`, which costs an attribute write. The
thread writes `<stage>/ranks/<rank>.json` every `interval_s` (`extrema.run.rank_progress`) and, unless
`EXTREMA_HANG_TIMEOUT_S` is 0, watches for a hang:

- this rank made no progress (no step finished, no phase changed) for hang_timeout_s in a training phase (in
  `starting`, `saving`, `evaluating`, `finishing`: for the longer of it and the collective timeout), or
- a rank's record went unwritten for hang_timeout_s (rank 0 reads every rank's each tick, the others rank 0's, a
  rank that stopped progressing all): its process cannot act (SIGSTOP, frozen, swapped out), so nobody waits for
  the collective timeout.

Then it dumps the Python stacks of this process's threads (`<stage>/hang/<rank>.txt`); the lowest rank whose record
is still written reports: it declares the hang (`hang/declared.json`, which every live rank reads at its next tick
and answers with its own dump), waits a little for the live ranks' dumps, names the rank behind (no record or the
stalest, else fewest steps, then not in a collective, then the oldest progress; a rank inside a collective waits
on that one) with its host, pid, step, phase and the innermost frame of its main thread (or says its stack is
unavailable), records the stage failed with that line in status.json, releases the lease and ends the process
with exit code 1, as every other live rank does: the backend retries from the last checkpoint.

Rank 0 also compares the ranks' loading times over a window and records persistent stragglers
(`ranks/stragglers.json`); with `EXTREMA_STRAGGLER_ACTION=fail` (the launcher's `resources.straggler_action`) it ends
the attempt as for a hang, naming the stragglers' nodes bad so that the retry avoids them.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from extrema.run import bad_nodes, contract, lease, rank_progress, rundir
from extrema.run.rank_progress import RankRecord

REMOTE_INTERVAL_S = 5.0  # at least this between two writes of a record on an object store
DUMP_GRACE_S = 5.0  # how long the reporting rank waits for the live ranks' dumps


def interval_for(timeout_s: float, stage_dir: str) -> float:
    """Seconds between two ticks: a fifth of the hang timeout, within [0.5, 10] s (object stores: >= 5 s)."""
    base = min(max((timeout_s or rank_progress.DEFAULT_HANG_TIMEOUT_S) / 5, 0.5), 10.0)
    return base if rundir.local_path(stage_dir) is not None else max(base, REMOTE_INTERVAL_S)


class Watchdog:
    """One rank's progress (set by the training loop) and the thread that records it and watches for a hang."""

    def __init__(
        self,
        stage_dir: str,
        rank: int,
        ranks: list[dict[str, Any]],
        timeout_s: float,
        interval_s: float | None = None,
        end: Callable[[int], object] = os._exit,
        held: lease.Lease | None = None,
        straggler_action: str = "flag",
    ) -> None:
        self.stage_dir, self.rank, self.world = stage_dir, rank, len(ranks)
        self.held = held  # the lease (rank 0 under the job entry): fences the hang record; released on ending
        self.place = ranks[rank] if rank < len(ranks) else contract.this_process(rank)
        self.attempt = f"{ranks[0].get('host')}:{ranks[0].get('pid')}"
        self.timeout_s = timeout_s
        self.straggler_action = straggler_action
        self.interval_s = interval_s or interval_for(timeout_s, stage_dir)
        self.end = end
        now = time.time()
        self.started_at = now
        self.step, self.step_at = 0, now
        self.phase, self.phase_at = rank_progress.STARTING, now
        self.timed_since: float | None = None  # when the step in progress began (None: the next one is untimed)
        self.loading_since: float | None = None
        self.loading_s = 0.0
        self.step_times: collections.deque[float] = collections.deque(maxlen=rank_progress.WINDOW)
        self.data_times: collections.deque[float] = collections.deque(maxlen=rank_progress.WINDOW)
        self.slow_checks: dict[int, int] = {}
        self.flagged: list[int] = []
        self.dumped = False
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="extrema-watchdog", daemon=True)

    # --- called by the training loop (main thread): attribute writes only ---------------------------------------

    def set_phase(self, phase: str) -> None:
        """This rank enters `phase` (rank_progress's names)."""
        if phase == self.phase:
            return
        now = time.time()
        if self.phase == rank_progress.LOADING and self.loading_since is not None:
            self.loading_s += now - self.loading_since
            self.loading_since = None
        if phase == rank_progress.LOADING:
            self.loading_since = now
        self.phase, self.phase_at = phase, now

    def resumed(self, step: int) -> None:
        """The loop starts at `step` (restored from a checkpoint): the next step is timed from its start."""
        self.step, self.step_at = step, time.time()
        self.timed_since = None

    def finished(self, step: int) -> None:
        """Step `step` finished (the optimizer stepped); the loop's end follows."""
        now = time.time()
        if self.timed_since is not None and step > self.step:
            self.step_times.append((now - self.timed_since) / (step - self.step))
            self.data_times.append(self.loading_s / (step - self.step))
        self.step, self.step_at = step, now
        self.timed_since, self.loading_s = now, 0.0

    # --- the thread ----------------------------------------------------------------------------------------------

    def start(self) -> Watchdog:
        self.write(time.time())
        self.thread.start()
        return self

    def stop(self) -> None:
        """End the thread and leave the record saying this rank ended (not frozen)."""
        self.stopping.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(timeout=self.interval_s + 5)
        self.phase = rank_progress.ENDED
        with contextlib.suppress(Exception):
            self.write(time.time())

    def _run(self) -> None:
        while not self.stopping.wait(self.interval_s):
            try:
                self.tick(time.time())
            except Exception as e:  # a store that does not answer now: the next tick tries again
                print(f"extrema.watchdog: rank {self.rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def record(self, now: float) -> RankRecord:
        """This rank's progress record as of `now`."""
        median = statistics.median
        return RankRecord(
            rank=self.rank,
            host=str(self.place.get("host")),
            pid=self.place.get("pid") if isinstance(self.place.get("pid"), int) else None,
            attempt=self.attempt,
            step=self.step,
            step_at=self.step_at,
            phase=self.phase,
            phase_at=self.phase_at,
            written_at=now,
            step_s=median(self.step_times) if self.step_times else None,
            data_s=median(self.data_times) if self.data_times else None,
        )

    def write(self, now: float) -> None:
        rank_progress.write(self.stage_dir, self.record(now))

    def limit(self) -> float:
        """Seconds without progress that make this rank count as hung, in its current phase."""
        if self.phase in rank_progress.TRAINING:
            return self.timeout_s
        return max(self.timeout_s, contract.collective_timeout_s())

    def tick(self, now: float) -> None:
        """Write the record; end the process when a hang is declared or seen (see the module docstring)."""
        self.write(now)
        if self.timeout_s <= 0:
            return
        if self.declared() is not None:
            self.dump()
            self.finish("another rank ended this attempt (hung or a straggler; see the stage's status)")
        stuck = now - max(self.step_at, self.phase_at) > self.limit()
        if not stuck and self.rank != 0:  # one read a tick: rank 0 watches the others, the others watch rank 0
            main = rank_progress.read(self.stage_dir, 0)
            main = main if main is not None and main.attempt == self.attempt else None
            if (main is None and now - self.started_at > self.timeout_s) or (
                main is not None and rank_progress.frozen(main, now, self.timeout_s)
            ):
                self.hang()
            return
        records = rank_progress.read_all(self.stage_dir, self.attempt)
        if self.rank == 0:
            self.check_stragglers(records)
        if stuck or self.peer_frozen(records, now):
            self.hang()

    def peer_frozen(self, records: dict[int, RankRecord], now: float) -> bool:
        """Whether another rank's record went unwritten for the hang timeout (or never came)."""
        late = now - self.started_at > self.timeout_s
        for r in range(self.world):
            rec = records.get(r)
            if r != self.rank and ((rec is None and late) or (rec and rank_progress.frozen(rec, now, self.timeout_s))):
                return True
        return False

    def declared(self) -> dict[str, Any] | None:
        """The hang another rank declared in this attempt, if any."""
        try:
            doc = contract.read_record(rank_progress.declared_url(self.stage_dir))
        except (contract.Unreadable, OSError):
            return None
        return doc if doc and doc.get("attempt") == self.attempt else None

    def dump(self) -> None:
        """Write the Python stacks of every thread of this process to `<stage>/hang/<rank>.txt` (once)."""
        if self.dumped:
            return
        self.dumped = True
        main = threading.main_thread().ident or 0
        with tempfile.TemporaryFile("w+") as f:
            f.write(f"{rank_progress.MAIN_HEADER}0x{main:016x}\n")
            f.write(f"rank {self.rank} on {self.place.get('host')} (pid {self.place.get('pid')}), step {self.step}, ")
            f.write(f"{self.phase} since {time.time() - self.phase_at:.1f} s\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
            f.seek(0)
            text = f.read()
        rundir.write_text_atomic(rank_progress.dump_url(self.stage_dir, self.rank), text)

    def hang(self) -> None:
        """This rank saw the hang: dump, then report it (the lowest live rank) or wait for the report; end."""
        self.dump()
        now = time.time()
        records = rank_progress.read_all(self.stage_dir, self.attempt)
        live = [r for r, rec in records.items() if r == self.rank or not rank_progress.frozen(rec, now, self.timeout_s)]
        if min(live, default=self.rank) != self.rank:
            deadline = time.monotonic() + DUMP_GRACE_S + 2 * self.interval_s
            while self.declared() is None and time.monotonic() < deadline:
                self.write(time.time())  # stay visibly live while the reporter looks
                time.sleep(min(self.interval_s, 1.0))
            self.finish("the stage hung")
        self.declare([r for r in live if r != self.rank])
        now = time.time()
        records = rank_progress.read_all(self.stage_dir, self.attempt)
        culprit, why = rank_progress.behind(records, self.world, now, self.timeout_s)
        frame = None
        try:
            raw = contract.read_bytes(rank_progress.dump_url(self.stage_dir, culprit))
            frame = rank_progress.innermost_frame(raw.decode(errors="replace")) if raw else None
        except (contract.Unreadable, OSError):
            pass
        line = rank_progress.describe_hang(self.stage_dir, records.get(culprit), culprit, why, frame)
        self.record_failure(line, lambda: self.culprit_node(records.get(culprit), culprit, now), "hung")
        self.finish("the stage hung")

    def declare(self, others: list[int]) -> None:
        """Tell every rank that this attempt ends (`hang/declared.json`) and wait a little for the others' dumps."""
        rundir.write_json(rank_progress.declared_url(self.stage_dir), {"attempt": self.attempt, "by": self.rank})
        deadline = time.monotonic() + DUMP_GRACE_S
        while time.monotonic() < deadline and not all(
            rundir.exists(rank_progress.dump_url(self.stage_dir, r)) for r in others
        ):
            time.sleep(0.2)

    def record_failure(self, line: str, named: Callable[[], dict[str, Any]], what: str) -> None:
        """Record the stage failed with `line` and the bad nodes `named` gives, fenced by the lease; never raises."""
        print(f"extrema.watchdog: {line}", file=sys.stderr, flush=True)
        try:
            if self.held is not None:
                self.held.fence(f"status failed ({what})")
            now = time.time()
            contract.update_status(
                self.stage_dir, state=contract.StageState.FAILED, finished_at=now, error=line, **named()
            )
            rundir.write_json(
                rank_progress.declared_url(self.stage_dir), {"attempt": self.attempt, "by": self.rank, "error": line}
            )
        except Exception as e:  # the lease was lost or the store does not answer: end all the same
            print(f"extrema.watchdog: {what} not recorded: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    def culprit_node(self, rec: RankRecord | None, rank: int, now: float) -> dict[str, Any]:
        """The status fields naming the hung rank's node bad ({} when its node is unknown)."""
        if rec is None:
            return {}
        reason = f"rank {rank} (pid {rec.pid}) hung at step {rec.step + 1} in {rec.phase}"
        return bad_nodes.added(self.stage_dir, [rec.host], reason, now)

    def finish(self, why: str) -> None:
        """End this process now (exit code 1): the main thread is stuck and cannot end it."""
        print(f"extrema.watchdog: rank {self.rank}: {why}; ending this process", file=sys.stderr, flush=True)
        if self.held is not None:
            with contextlib.suppress(Exception):
                self.held.release(contract.StageState.FAILED)
        sys.stderr.flush()
        self.end(contract.EXIT_FAILED)
        raise SystemExit(contract.EXIT_FAILED)  # `end` returned (a test's): the thread ends

    def check_stragglers(self, records: dict[int, RankRecord]) -> None:
        """Rank 0: flag ranks slow at loading data in STRAGGLER_CHECKS consecutive checks (`ranks/stragglers.json`)."""
        slow = set(rank_progress.stragglers(records))
        self.slow_checks = {r: self.slow_checks.get(r, 0) + 1 for r in slow}
        flagged = sorted(r for r, n in self.slow_checks.items() if n >= rank_progress.STRAGGLER_CHECKS)
        if flagged == self.flagged:
            return
        self.flagged = flagged
        healthy = [rec.data_s for r, rec in records.items() if rec.data_s is not None and r not in flagged]
        middle = statistics.median(healthy or [0.0])
        ranks = [
            {"rank": r, "host": records[r].host, "data_s": records[r].data_s, "step_s": records[r].step_s}
            for r in flagged
            if r in records
        ]
        doc = {"attempt": self.attempt, "median_data_s": middle, "ranks": ranks, "at": time.time()}
        rundir.write_json(rank_progress.stragglers_url(self.stage_dir), doc)
        for r in ranks:
            print(f"extrema.watchdog: straggler: rank {r['rank']} on {r['host']} loads data in {r['data_s']:.3f} s a "
                  f"step, the other ranks' median {middle:.3f} s", file=sys.stderr, flush=True)  # fmt: skip
        if ranks and self.straggler_action == "fail":
            self.end_for_stragglers(ranks, middle)

    def end_for_stragglers(self, ranks: list[dict[str, Any]], middle: float) -> None:
        """Rank 0, straggler_action fail: end the attempt as a hang would (every rank dumps its stacks and ends), the
        stage failed naming the stragglers' nodes bad, so that the retry avoids them."""
        self.dump()
        self.declare([r for r in range(self.world) if r != self.rank])
        line = rank_progress.describe_stragglers(ranks, middle)
        hosts = sorted({str(r["host"]) for r in ranks})
        reason = "straggler: " + ", ".join(f"rank {r['rank']} loads data {r['data_s']:.3f} s a step" for r in ranks)
        self.record_failure(line, lambda: bad_nodes.added(self.stage_dir, hosts, reason, time.time()), "straggler")
        self.finish("a straggler ended the stage (straggler_action: fail)")


_active: Watchdog | None = None


class Idle:
    """What `active()` gives when no watchdog runs (a stage called outside `extrema.entry`)."""

    phase = ""

    def set_phase(self, phase: str) -> None:
        pass

    def resumed(self, step: int) -> None:
        pass

    def finished(self, step: int) -> None:
        pass


IDLE = Idle()


def active() -> Watchdog | Idle:
    """This process's watchdog, or one that does nothing."""
    return _active or IDLE


@contextlib.contextmanager
def started(stage_dir: str, rank: int, ranks: list[dict[str, Any]], held: lease.Lease | None = None) -> Any:
    """Run a watchdog for this rank of the stage while the block runs (the hang timeout from the environment); `held`:
    the attempt's lease, when this process holds it."""
    global _active
    timeout_s, action = rank_progress.hang_timeout_s(), rank_progress.straggler_action()
    dog = Watchdog(stage_dir, rank, ranks, timeout_s, held=held, straggler_action=action).start()
    _active = dog
    try:
        yield dog
    finally:
        _active = None
        dog.stop()
