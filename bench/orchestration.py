"""Orchestration overheads of `extrema-launch` at sweep scale, measured in one run on this machine.

    python bench/orchestration.py [--runs 10000] [--slurm-runs 1000] [--slurm-max-array 2 1001] [--no-slurm]
    python bench/orchestration.py --only-refusals

1. expansion + planning: load a sweep file of `--runs` runs (a 100 x 100 grid over pretrain.seed and
   pretrain.base_lr, stages pretrain and knn), validate and expand it, and plan its stage jobs (the DAG);
2. `extrema-launch status <url>` over a file:// run store of `--runs` run directories (one completed pretrain
   stage each: status.json, result.json, provenance.json; the runs and ids of step 1);
3. `extrema-launch results <url> --out results.parquet` over the same `--runs` result files;
4. `sbatch` calls for a `--slurm-runs`-run single-stage sweep: counted from the Slurm backend's own planning
   (`planned_arrays`) for MaxArraySize 2, 300 and 1001 (Slurm's default), then measured for real for each
   `--slurm-max-array` value: `extrema-launch sweep` against a private Slurm 22.05 (the test fixture's, started
   with that MaxArraySize; the tests run it with 2) with every job held, and an `sbatch` wrapper on PATH counting
   the calls; the jobs are cancelled and the cluster stopped afterwards.

5. refusing oversize input: `extrema-launch sweep FILE` in a fresh process for a grid of 10^6 runs, a grid of
   10^12 runs, a "billion laughs" YAML (ten levels of nine: 9^10 strings from 0.5 KB) and a 10 MB YAML; the time
   to exit 2 and the process's own peak resident memory (VmHWM), start-up included (the bare CLI takes ~85 MB).

Times are the median of three repetitions (the machine is shared); the target is under 2 s each.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # for tests.clusters, the private Slurm

from launch.backends.slurm.plan import planned_arrays  # noqa: E402
from launch.cli import main  # noqa: E402
from launch.pipeline import plan  # noqa: E402
from launch.runstore import store  # noqa: E402
from launch.sweepfile.expand import load_runs  # noqa: E402
from launch.sweepfile.model import Run  # noqa: E402

TARGET_S = 2.0
REPEATS = 3


def median_time(fn: Callable[[], Any], repeats: int = REPEATS) -> tuple[float, Any]:
    """Median wall time of `fn` over `repeats` calls, and the last result."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def quiet(argv: list[str]) -> int:
    """Run the CLI in this process with its output discarded; the exit code."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return main(argv)


def sweep_file(path: Path, runs: int, stages: list[str], launcher: dict[str, Any]) -> Path:
    """The tiny sweep with a grid of `runs` points over pretrain.seed x pretrain.base_lr."""
    doc = yaml.safe_load((REPO / "jobs" / "tiny.yaml").read_text())
    side = max(1, round(runs**0.5))
    while runs % side:
        side -= 1
    doc["base"]["stages"] = stages
    doc["sweep"] = {
        "grid": {
            "pretrain.seed": list(range(side)),
            "pretrain.base_lr": [round(1e-5 * (i + 1), 8) for i in range(runs // side)],
        }
    }
    doc["launcher"] = launcher
    path.write_text(yaml.safe_dump(doc))
    return path


def fill_store(url: str, runs: list[Run]) -> None:
    """A run store of completed pretrain stages, written directly (setup, not measured)."""
    base = url.removeprefix("file://")
    now = time.time()
    for i, r in enumerate(runs):
        stage = f"{base}/{r.run_id}/pretrain"
        os.makedirs(stage, exist_ok=True)
        docs = {
            "status.json": {"state": "completed", "attempts": 1, "backend": "slurm", "job_id": f"7_{i}",
                            "submitted_at": now - 600, "started_at": now - 500, "finished_at": now - 20,
                            "error": None, "host": "node1"},
            "result.json": {"loss_final": 2.0 - i / len(runs), "steps": 4, "total_steps": 4, "world_size": 1},
            "provenance.json": {"host": "node1", "git_sha": "0" * 40, "git_dirty": False, "world_size": 1,
                                "packages": {"extrema": "0.1.0"}},
        }  # fmt: skip
        for name, doc in docs.items():
            with open(f"{stage}/{name}", "w") as f:
                json.dump(doc, f)
    manifest = {
        "sweep": "bench",
        "backend": "slurm",
        "launcher": {"backend": "slurm"},
        "log_dir": f"{base}/logs",
        "runs": [{"run_id": r.run_id, "stages": ["pretrain"], "overrides": r.overrides} for r in runs],
        "created_at": now,
    }
    with open(f"{base}/manifest.json", "w") as f:
        json.dump(manifest, f)


def sbatch_counter(folder: Path) -> tuple[Path, Path]:
    """A directory with an `sbatch` that counts its calls (one line each) and runs the real one."""
    real = shutil.which("sbatch")
    if real is None:
        raise RuntimeError("sbatch is not installed")
    count = folder / "sbatch-calls"
    shim = folder / "bin" / "sbatch"
    shim.parent.mkdir(parents=True)
    shim.write_text(f'#!/bin/sh\necho "$@" >> "{count}"\nexec "{real}" "$@"\n')
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR)
    return shim.parent, count


def real_slurm(tmp: Path, runs: int, max_array: int) -> tuple[int, float, int]:
    """(sbatch calls, seconds, jobs in the queue) of `extrema-launch sweep` of a `runs`-run single-stage sweep
    against a private Slurm with MaxArraySize `max_array`, every job held."""
    from tests.clusters.slurm import start_slurm, stop_slurm

    tmp.mkdir(parents=True)
    cluster = start_slurm(tmp / "slurm", max_array_size=max_array)
    env = {k: os.environ.get(k) for k in ("SLURM_CONF", "PATH")}
    try:
        bin_dir, count = sbatch_counter(tmp / "shim")
        os.environ["SLURM_CONF"] = str(cluster.conf)
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
        launcher = {"backend": "slurm", "resources": {"partition": cluster.partition, "sbatch_extra": {"hold": ""}}}
        path = sweep_file(tmp / "slurm.yaml", runs, ["pretrain"], launcher)
        t0 = time.perf_counter()
        code = quiet(["sweep", str(path), "--root", str(tmp / "slurm-runs")])
        took = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"extrema-launch sweep exited with {code}")
        calls = len(count.read_text().splitlines())
        queued = len(cluster.run("squeue", "-h", "-r", "-o", "%i").stdout.split())
        return calls, took, queued
    finally:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_slurm(cluster)


# The CLI in a fresh process, writing its own peak resident memory (kB) to PEAK_FILE; an address-space cap keeps a
# launcher that does not refuse from taking the machine down.
PEAK_CHILD = """
import os, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
from launch.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    peak = next(line.split()[1] for line in f if line.startswith("VmHWM"))
with open(os.environ["PEAK_FILE"], "w") as f:
    f.write(peak)
sys.exit(code)
"""


def oversize_inputs(tmp: Path) -> dict[str, Path]:
    """Sweep files the launcher must refuse at validation: too many runs, an alias bomb, too many bytes."""
    doc = yaml.safe_load((REPO / "jobs" / "tiny.yaml").read_text())
    axes = {
        "pretrain.seed": list(range(1000)),
        "pretrain.base_lr": [1e-5 * (i + 1) for i in range(1000)],
        "pretrain.weight_decay": [1e-3 * i for i in range(1000)],
        "pretrain.warmup_epochs": list(range(1000)),
    }
    grids = {"grid of 10^6 runs": dict(list(axes.items())[:2]), "grid of 10^12 runs": axes}
    out = {}
    for i, (name, grid) in enumerate(grids.items()):
        out[name] = tmp / f"grid{i}.yaml"
        out[name].write_text(yaml.safe_dump({**doc, "sweep": {"grid": grid}}, sort_keys=False))
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(97 + i)}: &{chr(97 + i)} [{', '.join(['*' + chr(96 + i)] * 9)}]" for i in range(1, 10)]
    out["billion laughs (9^10 strings)"] = tmp / "lol.yaml"
    out["billion laughs (9^10 strings)"].write_text(
        "name: lol\nbase:\n  data:\n    extra:\n" + "".join(f"      {line}\n" for line in lines)
    )
    out["10 MB YAML"] = tmp / "big.yaml"
    out["10 MB YAML"].write_text("name: big\nx: [" + ",".join(["1"] * 5_000_000) + "]\n")
    return out


def refusal(path: Path, tmp: Path) -> tuple[int, float, float, str]:
    """(exit code, seconds, peak MB, last stderr line) of `extrema-launch sweep PATH` in a fresh process."""
    peak = tmp / "peak"
    env = {**os.environ, "PEAK_FILE": str(peak), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_CHILD, "sweep", str(path), "--root", str(tmp / "runs")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    took = time.perf_counter() - t0
    peak_mb = int(peak.read_text()) / 1024 if peak.exists() else float("nan")
    peak.unlink(missing_ok=True)
    lines = proc.stderr.strip().splitlines()
    return proc.returncode, took, peak_mb, lines[-1] if lines else ""


def refusals_table() -> Table:
    """Time and peak memory to refuse each oversize input (median time of REPEATS runs)."""
    table = Table(title=f"refusing oversize input ({os.cpu_count()} CPUs; median of {REPEATS})")
    for col in ("input", "size", "exit", "seconds", "peak MB", "message (cut)"):
        table.add_column(col)
    with tempfile.TemporaryDirectory(prefix="extrema-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        for name, path in oversize_inputs(tmp).items():
            results = [refusal(path, tmp) for _ in range(REPEATS)]
            code, _, peak_mb, line = results[-1]
            took = statistics.median(r[1] for r in results)
            size = f"{path.stat().st_size:,} B"
            message = line.split(": ", 2)[-1][:70]
            table.add_row(name, size, str(code), f"{took:.2f}", f"{peak_mb:.0f}", message)
    return table


def main_bench() -> None:
    """Run every measurement and print one table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--slurm-runs", type=int, default=1000)
    parser.add_argument("--slurm-max-array", type=int, nargs="+", default=[2, 1001], help="MaxArraySize values")
    parser.add_argument("--no-slurm", action="store_true", help="skip the real Slurm measurement")
    parser.add_argument("--only-refusals", action="store_true", help="measure only the refusal of oversize input")
    args = parser.parse_args()
    console = Console(width=None if sys.stdout.isatty() else 120)
    if args.only_refusals:
        console.print(refusals_table())
        return
    table = Table(title=f"extrema-launch orchestration ({os.cpu_count()} CPUs; median of {REPEATS})")
    for col in ("measurement", "size", "result", "target"):
        table.add_column(col)

    def verdict(seconds: float) -> str:
        return f"< {TARGET_S:.0f} s: {'ok' if seconds < TARGET_S else 'MISSED'}"

    with tempfile.TemporaryDirectory(prefix="extrema-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        path = sweep_file(tmp / "big.yaml", args.runs, ["pretrain", "knn"], {"backend": "slurm"})

        def expand_and_plan() -> tuple[list[Run], int]:
            sweep, runs = load_runs(path)
            return runs, len(plan(runs, sweep.launcher, f"file://{tmp}/runs/bench"))

        took, (runs, n_jobs) = median_time(expand_and_plan)
        table.add_row("expand + plan", f"{len(runs)} runs, {n_jobs} stage jobs", f"{took:.2f} s", verdict(took))

        url = store.sweep_url(f"file://{tmp}/runs", "bench")
        fill_store(url, runs)
        took, code = median_time(lambda: quiet(["status", url]))
        assert code == 0, f"status exited with {code}"
        table.add_row("status (file://)", f"{len(runs)} run dirs", f"{took:.2f} s", verdict(took))
        out = tmp / "results.parquet"
        took, code = median_time(lambda: quiet(["results", url, "--out", str(out)]))
        assert code == 0, f"results exited with {code}"
        table.add_row("results -> parquet (file://)", f"{len(runs)} result files", f"{took:.2f} s", verdict(took))

        small = sweep_file(tmp / "single.yaml", args.slurm_runs, ["pretrain"], {"backend": "slurm"})
        sweep, single = load_runs(small)
        pretrain = plan(single, sweep.launcher, store.sweep_url(f"file://{tmp}/runs", sweep.name))
        for max_array in sorted({2, 300, 1001, *args.slurm_max_array}):
            calls = len(planned_arrays(pretrain, max_array))
            chunks = -(-len(pretrain) // max_array)
            table.add_row(
                "sbatch calls (planned)",
                f"{len(pretrain)} runs, MaxArraySize {max_array}",
                str(calls),
                f"{chunks} (one per chunk): {'ok' if calls == chunks else 'MISSED'}",
            )
        for max_array in [] if args.no_slurm else args.slurm_max_array:
            try:
                calls, took, queued = real_slurm(tmp / f"real-{max_array}", args.slurm_runs, max_array)
            except Exception as e:  # no root, no Slurm binaries: the planned counts stand
                table.add_row("sbatch calls (real Slurm 22.05)", "-", f"not measured: {e}", "-")
                break
            chunks = -(-args.slurm_runs // max_array)
            table.add_row(
                "sbatch calls (real Slurm 22.05)",
                f"{args.slurm_runs} runs, MaxArraySize {max_array}",
                f"{calls} ({took:.1f} s, {queued} tasks queued)",
                f"{chunks} (one per chunk): {'ok' if calls == chunks else 'MISSED'}",
            )
    console.print(table)
    console.print(refusals_table())


if __name__ == "__main__":
    main_bench()
