"""The cost of the per-rank progress records and the hang watchdog on a training step (issue #30).

`python bench/hang_watch.py [--steps 40] [--rounds 3]`: the tiny pretraining stage of the test suite, in one
process, run with the watchdog (a record written every 0.5 s, the most often it ever writes; hang timeout 600 s) and
without it (no watchdog started: the loop's phase calls do nothing), interleaved; prints the median seconds per step
of each and their ratio, and the cost of the loop's calls and of one record write measured alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extrema import entry
from extrema.run import rank_progress, rundir
from extrema.train import watchdog
from tests.stage_runs import make_run


@contextlib.contextmanager
def no_watchdog(stage_dir: str, rank: int, ranks: list[dict[str, Any]], held: Any = None) -> Iterator[None]:
    yield None


def seconds_per_step(steps: int, watched: bool) -> float:
    """Median seconds per logged step of one run (the first two steps left out: warm-up)."""
    with tempfile.TemporaryDirectory() as d:
        make_run(d, {"pretrain": {"steps": steps, "ckpt_every": steps, "log_every": 1}})
        os.environ[rank_progress.HANG_TIMEOUT_ENV] = "600"  # no false hang on a loaded machine...
        watchdog.interval_for = lambda timeout_s, stage_dir: 0.5  # ...with a record every 0.5 s: the most often
        started = watchdog.started
        if not watched:
            watchdog.started = no_watchdog  # type: ignore[assignment]
        try:
            assert entry.main([d, "pretrain"]) == 0
        finally:
            watchdog.started = started  # type: ignore[assignment]
        rows = [r for r in rundir.read_jsonl(str(Path(d) / "pretrain" / "metrics.jsonl")) if "images_per_s" in r]
        times = [32 / r["images_per_s"] for r in rows[2:] if r["images_per_s"]]
        return statistics.median(times)


def loop_calls(n: int = 100_000) -> float:
    """Seconds per step of the loop's calls into a running watchdog (finished + four phase changes)."""
    with tempfile.TemporaryDirectory() as d:
        dog = watchdog.Watchdog(d, 0, [{"rank": 0, "host": "h", "pid": 1}], 0, interval_s=3600)
        t0 = time.perf_counter()
        for i in range(n):
            dog.finished(i)
            dog.set_phase(rank_progress.SYNC)
            dog.set_phase(rank_progress.LOADING)
            dog.set_phase(rank_progress.COMPUTE)
            dog.set_phase(rank_progress.SYNC)
        return (time.perf_counter() - t0) / n


def record_write(n: int = 200) -> float:
    """Seconds per record write (what the thread does each tick) on a local filesystem."""
    with tempfile.TemporaryDirectory() as d:
        dog = watchdog.Watchdog(d, 0, [{"rank": 0, "host": "h", "pid": 1}], 0, interval_s=3600)
        t0 = time.perf_counter()
        for _ in range(n):
            dog.write(time.time())
        return (time.perf_counter() - t0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    on, off = [], []
    for _ in range(args.rounds):
        off.append(seconds_per_step(args.steps, watched=False))
        on.append(seconds_per_step(args.steps, watched=True))
    a, b = statistics.median(off), statistics.median(on)
    print(f"step without watchdog: {a * 1e3:.1f} ms (median of {args.rounds} runs of {args.steps} steps)")
    print(f"step with watchdog (record every 0.5 s): {b * 1e3:.1f} ms")
    print(f"ratio with / without: {b / a:.3f}")
    print(f"loop calls per step: {loop_calls() * 1e6:.2f} us; one record write: {record_write() * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
