"""What the code snapshot costs a sweep submission, measured in one run on this machine.

    python bench/snapshot.py [--repeats 5]

Baseline, measured in the same run: `extrema-launch sweep jobs/tiny.yaml --dry-run --snapshot off` in this process
(load, validate, expand, plan, read the store, print the plan). Then what a submission adds with the snapshot on:
taking the snapshot of this checkout, saving it to a fresh file:// store, saving it again (content-addressed: a
no-op) and finding the directory jobs import it from. Prints medians and the added cost as a ratio of the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

from launch.cli import main as cli
from launch.runstore import snapshot

TINY = Path(__file__).resolve().parent.parent / "jobs" / "tiny.yaml"


def timed(fn: object, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    """Measure and print."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    snap = snapshot.take()
    take_s = timed(snapshot.take, args.repeats)

    def fresh_save() -> None:
        with tempfile.TemporaryDirectory() as d:
            snapshot.save(snap, d)

    save_s = timed(fresh_save, args.repeats)
    with tempfile.TemporaryDirectory() as d:
        snapshot.save(snap, d)
        again_s = timed(lambda: snapshot.save(snap, d), args.repeats)
        copy_s = timed(lambda: snapshot.local_copy(snapshot.code_url(d, snap.id), Path(d) / "cache"), args.repeats)
    with tempfile.TemporaryDirectory() as d:

        def plan_only() -> None:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                assert cli(["sweep", str(TINY), "--dry-run", "--snapshot", "off", "--root", d]) == 0

        base_s = timed(plan_only, args.repeats)
    size = sum(map(len, snap.files.values()))
    print(f"snapshot of {snapshot.source_root()}: {len(snap.files)} files, {size / 1e6:.2f} MB, id {snap.id}")
    print(f"take                    {take_s * 1e3:8.1f} ms")
    print(f"save (fresh store)      {save_s * 1e3:8.1f} ms")
    print(f"save (already stored)   {again_s * 1e3:8.1f} ms")
    print(f"local copy (local root) {copy_s * 1e3:8.1f} ms")
    print(f"baseline: sweep --dry-run --snapshot off {base_s * 1e3:8.1f} ms")
    print(f"added by the snapshot (take + fresh save) / baseline: {(take_s + save_s) / base_s:.3f}")


if __name__ == "__main__":
    main()
