"""`status` and `results` of a large finished sweep on an S3 server, timed and counted, in one run.

    python bench/status_scale.py [--runs 1000 10000] [--repeats 2]

For each size: a run store on a moto S3 server on localhost (real s3fs, signed requests) holding a sweep of that
many runs, each with a completed pretrain and knn stage (status.json, result.json, provenance.json) and the
manifest in parts, written directly (set-up, not measured); then, in fresh processes as a user runs them,
`extrema-launch status URL` with no ledger yet (every record read; it writes the ledger of completed stages),
`status` again, and `results URL --out results.parquet`: wall time (median of --repeats for the last two) and the
server's request count by method for one run, from its access log.
The moto server runs on the same two cores as the client, so its own CPU is part of every figure.
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
sys.path.insert(0, str(REPO))  # for tests.s3server, the moto server the tests use

import fsspec  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from launch.runstore import store  # noqa: E402
from tests.s3server import KEY, SECRET, S3Server, running_server  # noqa: E402

BUCKET = "bench"
TARGET_S = 10.0


def fill(server: S3Server, sweep: str, runs: int) -> float:
    """Write a finished sweep of `runs` runs to the server; the seconds it took."""
    started = time.perf_counter()
    fs = fsspec.filesystem("s3", key=KEY, secret=SECRET, client_kwargs={"endpoint_url": server.endpoint})
    now = time.time()
    run_ids = [f"r{i:06d}" for i in range(runs)]
    files: dict[str, bytes] = {}
    for i, run_id in enumerate(run_ids):
        for stage, result in (("pretrain", {"loss_final": 2.0 - i / runs, "steps": 4}), ("knn", {"knn_top1": 50.0})):
            base = f"{BUCKET}/{sweep}/{run_id}/{stage}"
            status = {"state": "completed", "attempts": 1, "backend": "local", "job_id": f"{i}",
                      "submitted_at": now - 600, "started_at": now - 500, "finished_at": now - 20, "error": None,
                      "host": "node1"}  # fmt: skip
            provenance = {"host": "node1", "git_sha": "0" * 40, "git_dirty": False, "world_size": 1}
            for name, doc in (("status.json", status), ("result.json", result), ("provenance.json", provenance)):
                files[f"{base}/{name}"] = json.dumps(doc).encode()
    for start in range(0, len(files), 2000):
        fs.pipe(dict(list(files.items())[start : start + 2000]))
    manifest = {
        "sweep": sweep,
        "root": f"s3://{BUCKET}",
        "source": "bench",
        "backend": "local",
        "launcher": {"backend": "local"},
        "log_dir": f"s3://{BUCKET}/{sweep}/logs",
        "runs": [{"run_id": r, "stages": ["pretrain", "knn"], "overrides": {"pretrain.seed": i}}
                 for i, r in enumerate(run_ids)],
        "created_at": now,
    }  # fmt: skip
    os.environ.update(AWS_ENDPOINT_URL=server.endpoint, AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET)
    store.write_manifest(f"s3://{BUCKET}/{sweep}", manifest)
    return time.perf_counter() - started


def requests_by_method(server: S3Server, since: int) -> dict[str, int]:
    """Requests the server logged after its first `since` lines, by method."""
    assert server.log is not None
    lines = server.log.read_text(errors="replace").splitlines()[since:]
    out: dict[str, int] = {}
    for line in lines:
        for method in ("GET", "HEAD", "PUT", "POST", "DELETE"):
            if f'"{method} ' in line:
                out[method] = out.get(method, 0) + 1
    return out


def log_length(server: S3Server) -> int:
    """Lines in the server's access log so far."""
    assert server.log is not None
    return len(server.log.read_text(errors="replace").splitlines())


def timed(server: S3Server, argv: list[str], env: dict[str, str], repeats: int) -> tuple[float, dict[str, int], int]:
    """(median wall seconds, requests of the first run by method, exit code) of `extrema-launch argv`."""
    times, first, code = [], {}, 0
    for i in range(repeats):
        before = log_length(server)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "launch.cli", *argv], env=env, capture_output=True, cwd=REPO)
        times.append(time.perf_counter() - started)
        code = proc.returncode
        if code != 0:
            print(proc.stderr.decode()[-2000:], file=sys.stderr)
        if i == 0:
            time.sleep(0.5)  # the server's log lags a little
            first = requests_by_method(server, before)
    return statistics.median(times), first, code


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    table = Table(title="status and results of a finished sweep on S3 (moto on localhost)")
    for col in ("runs", "set-up", "command", "wall (median)", "requests (first run)", "exit", "target 10 s"):
        table.add_column(col)
    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp) / "moto.log") as server:
        server.make_bucket(BUCKET)
        env = {**os.environ, "AWS_ENDPOINT_URL": server.endpoint, "AWS_ACCESS_KEY_ID": KEY,
               "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
               "OMP_NUM_THREADS": "1"}  # fmt: skip
        for runs in args.runs:
            sweep = f"scale{runs}"
            setup = fill(server, sweep, runs)
            url = f"s3://{BUCKET}/{sweep}"
            out = Path(tmp) / f"{sweep}.parquet"
            commands = (
                ("status, no ledger yet", ["status", url], 1),
                ("status", ["status", url], args.repeats),
                ("results", ["results", url, "--out", str(out)], args.repeats),
            )
            for name, argv, repeats in commands:
                wall, reqs, code = timed(server, argv, env, repeats)
                shown = ", ".join(f"{m} {n}" for m, n in sorted(reqs.items()))
                table.add_row(f"{runs:,}", f"{setup:.0f} s", name, f"{wall:.2f} s", shown, str(code),
                              "ok" if wall < TARGET_S else "over")  # fmt: skip
                print(f"{runs} runs, {name}: {wall:.2f} s, {shown}, exit {code}", flush=True)
    Console().print(table)


if __name__ == "__main__":
    main()
