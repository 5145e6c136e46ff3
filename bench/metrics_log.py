"""What one metrics line costs as the log grows: `MetricsLog` appending a record to a log of N lines, against
rewriting the whole log for each record (what the log did before), measured in the same run.

    python bench/metrics_log.py [--lines 1000 100000 1000000] [--records 20]

Each size: a metrics.jsonl of N pretraining-like records on the local filesystem (a temporary directory), opened
as a resumed stage opens it, then --records records logged and flushed one by one; prints the median seconds per
record of each way and their ratio, with the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time

from extrema.run import metrics_log, rundir


def record(step: int) -> dict[str, float]:
    """A metrics line as pretraining writes it."""
    return {"step": step, "total_steps": 375000, "epoch": step / 1251, "loss": 0.1234567, "lr": 1.5e-4,
            "wd": 0.1, "momentum": 0.996, "images_per_s": 3012.5}  # fmt: skip


def main() -> None:
    """Measure each size and print the table."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, nargs="+", default=[1000, 100_000, 1_000_000])
    ap.add_argument("--records", type=int, default=20)
    args = ap.parse_args()
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    print(next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if "Model name" in line), "cpu ?"))
    print(f"{'lines':>9} {'append s/record':>16} {'rewrite s/record':>17} {'ratio':>8}")
    for n in args.lines:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "metrics.jsonl")
            with open(path, "w") as f:
                f.writelines(json.dumps(record(i), sort_keys=True) + "\n" for i in range(n))
            log = metrics_log.MetricsLog(path, keep_after_step=n)
            appends = []
            for i in range(args.records):
                t0 = time.perf_counter()
                log.log(record(n + i), flush=True)
                appends.append(time.perf_counter() - t0)
            rewrites = []
            for _ in range(min(args.records, 5)):
                t0 = time.perf_counter()
                rundir.write_text_atomic(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in log.records))
                rewrites.append(time.perf_counter() - t0)
        a, r = statistics.median(appends), statistics.median(rewrites)
        print(f"{n:>9} {a:>16.6f} {r:>17.4f} {r / a:>8.0f}x")


if __name__ == "__main__":
    main()
