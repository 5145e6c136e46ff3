"""What the metrics log costs its readers and an object-store writer as it grows, measured in one run.

    python bench/metrics_read.py [--lines 1000 100000 1000000] [--status-gb 2]

1. Object store (fsspec `memory://`, which cannot append either): a flush of one record into a log of N lines,
   written in parts (`MetricsLog` now) against rewriting the whole log per flush (what it did before).
2. Progress: `launch.progress.latest_progress` (what `status` and a driver read every refresh) on a local
   metrics.jsonl of N lines: seconds per read.
3. `extrema-launch status` of a sweep whose one running stage has a metrics.jsonl of --status-gb GB, in a fresh
   process: wall time and the process's peak resident memory (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.test_records_shape, the finished sweep the tests use

from extrema.run import metrics_log, rundir  # noqa: E402
from extrema.run.contract import update_status  # noqa: E402
from launch import progress  # noqa: E402
from tests.test_records_shape import finished  # noqa: E402

PEAK = """
import os, sys
from launch.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    print("VmHWM", next(line.split()[1] for line in f if line.startswith("VmHWM")), file=sys.stderr)
sys.exit(code)
"""


def record(step: int) -> dict[str, float]:
    """A metrics line as pretraining writes it."""
    return {"step": step, "total_steps": 375000, "epoch": step / 1251, "loss": 0.1234567, "lr": 1.5e-4,
            "wd": 0.1, "momentum": 0.996, "images_per_s": 3012.5}  # fmt: skip


def lines_text(start: int, n: int) -> str:
    """n metrics lines from step `start`."""
    return "".join(json.dumps(record(i), sort_keys=True) + "\n" for i in range(start, start + n))


def object_store_flush(n: int, flushes: int = 5) -> tuple[float, float]:
    """(seconds per flush in parts, seconds per whole rewrite) at a log of n lines on memory://."""
    url = f"memory://bench-metrics-{n}/metrics.jsonl"
    log = metrics_log.MetricsLog(url)
    for start in range(0, n, 50_000):
        for i in range(start, min(n, start + 50_000)):
            log.log(record(i))
        log.flush()
    parts = []
    for i in range(flushes):
        t0 = time.perf_counter()
        log.log(record(n + i), flush=True)
        parts.append(time.perf_counter() - t0)
    whole = []
    for _ in range(min(flushes, 3)):
        t0 = time.perf_counter()
        rundir.write_text_atomic(url + ".whole", "".join(rundir.dumps(r, sort_keys=True) + "\n" for r in log.records))
        whole.append(time.perf_counter() - t0)
    return statistics.median(parts), statistics.median(whole)


def progress_read(n: int, reads: int = 5) -> float:
    """Seconds per `latest_progress` read of a local stage whose metrics.jsonl has n lines."""
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "metrics.jsonl"), "w") as f:
            for start in range(0, n, 100_000):
                f.write(lines_text(start, min(100_000, n - start)))
        times = []
        for _ in range(reads):
            t0 = time.perf_counter()
            assert progress.latest_progress(tmp)["step"] == n - 1
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def status_on_a_big_log(gigabytes: float) -> tuple[float, int, int]:
    """(wall seconds, peak KiB, exit code) of `extrema-launch status` with one running stage's log that large."""
    with tempfile.TemporaryDirectory() as tmp:
        url = finished(Path(tmp) / "runs")
        stage = sorted(Path(url).glob("*/pretrain"))[0]
        update_status(str(stage), state="running", finished_at=None)
        chunk = lines_text(0, 100_000)
        with open(stage / "metrics.jsonl", "w") as f:
            for _ in range(int(gigabytes * 1e9 // len(chunk)) + 1):
                f.write(chunk)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PEAK, "status", url], capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - t0
    peak = next((int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("VmHWM")), -1)
    return wall, peak, proc.returncode


def main() -> None:
    """Measure and print."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    ap.add_argument("--status-gb", type=float, default=2.0)
    args = ap.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "cpu ?"))
    print(f"{'lines':>9} {'object store: parts s/flush':>28} {'whole rewrite s/flush':>22} {'progress read s':>16}")
    for n in args.lines:
        part, whole = object_store_flush(n)
        print(f"{n:>9} {part:>28.5f} {whole:>22.4f} {progress_read(n):>16.5f}")
    wall, peak, code = status_on_a_big_log(args.status_gb)
    print(f"status, one running stage with a {args.status_gb:g} GB metrics.jsonl: {wall:.2f} s, "
          f"peak {peak / 1024:.0f} MiB, exit {code}")  # fmt: skip


if __name__ == "__main__":
    main()
