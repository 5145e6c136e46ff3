"""The cost of starting a stage's ranks on one node: torchrun against `extrema.entry --processes` (ranks forked
from one process that imported torch and the stage once; extrema/train/local_ranks.py).

`python bench/rank_start.py [--ranks 2] [--rounds 3] [--steps 2]`: the tiny pretraining stage of the test suite, run
to the end in a fresh run directory under each launcher in turn; prints the median wall seconds and CPU seconds
(every process of the launch: launcher and ranks, from wait4's resource usage) of each and their ratios. The work
after start-up is the same, so the difference is what the launcher's imports cost.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from extrema.run.environment import cpu_model
from tests.stage_runs import make_run


def launchers(ranks: int, run_dir: str) -> dict[str, list[str]]:
    """The command line of each launcher for the pretraining stage of `run_dir`."""
    entry = ["-m", "extrema.entry", run_dir, "pretrain"]
    return {
        "torchrun --standalone": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={ranks}",
            *entry,
        ],
        "extrema.entry --processes": [
            sys.executable,
            "-m",
            "extrema.entry",
            f"--processes={ranks}",
            run_dir,
            "pretrain",
        ],
    }


def one_launch(name: str, ranks: int, steps: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of every process) of one run of the stage under launcher `name`."""
    with tempfile.TemporaryDirectory() as d:
        make_run(d, {"pretrain": {"steps": steps, "ckpt_every": steps}})
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        subprocess.run(
            launchers(ranks, d)[name], check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
        )
        wall = time.perf_counter() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return wall, cpu


def main() -> None:
    """Run each launcher `--rounds` times, interleaved, and print the medians and ratios."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    names = list(launchers(args.ranks, ""))
    seen: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    for _ in range(args.rounds):  # interleaved, so that a change of load falls on both
        for name in names:
            seen[name].append(one_launch(name, args.ranks, args.steps))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; {args.ranks} ranks, {args.steps} steps, "
          f"median of {args.rounds}; load average {os.getloadavg()[0]:.1f}\n")  # fmt: skip
    print("| launcher | wall s | CPU s (all processes) |\n|---|---|---|")
    medians = {n: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s)) for n, s in seen.items()}
    for name, (wall, cpu) in medians.items():
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")
    (base_wall, base_cpu), (wall, cpu) = medians[names[0]], medians[names[1]]
    print(f"\nforked / torchrun: wall {wall / base_wall:.2f}, CPU {cpu / base_cpu:.2f}")


if __name__ == "__main__":
    main()
