"""Several configurations from one import of torch: `python -m extrema.check - --many` reads a JSON list of
`{"experiment": {...}, "argv": [...]}` on standard input and estimates each in a child forked from this process (a
fresh process for each fake process group, without importing torch again), a few at once; it prints a JSON list of
`{"result": {...}}` or `{"error": "..."}` in the same order. `extrema-launch check` uses it: a sweep's several
configurations then cost their steps, not an import of torch each.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

Job = dict[str, Any]


def child(job: Job, estimate: Callable[[Job], dict[str, Any]], out: str) -> None:
    """In the forked child: estimate one job, write its outcome to `out`, end without the parent's exit handlers."""
    code = 0
    try:
        payload: dict[str, Any] = {"result": estimate(job)}
    except ValueError as e:  # unusable input, worded for the user (InputError is one)
        payload = {"error": str(e)}
    except BaseException as e:  # the child always reports and ends
        payload, code = {"error": f"{type(e).__name__}: {e}"}, 1
    try:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(payload, f)
    finally:
        os._exit(code)


def estimate_many(jobs: Sequence[Job], estimate: Callable[[Job], dict[str, Any]], parallel: int) -> list[Job]:
    """Each job's outcome, estimated in a forked child, at most `parallel` at once, in the jobs' order."""
    outcomes: list[Job] = [{} for _ in jobs]
    with tempfile.TemporaryDirectory(prefix="extrema-check-") as folder:
        running: dict[int, int] = {}  # child pid -> job index
        waiting = list(range(len(jobs)))
        while waiting or running:
            while waiting and len(running) < max(1, parallel):
                index = waiting.pop(0)
                pid = os.fork()
                if pid == 0:
                    child(jobs[index], estimate, os.path.join(folder, f"{index}.json"))
                running[pid] = index
            pid, status = os.wait()
            index = running.pop(pid)
            path = os.path.join(folder, f"{index}.json")
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    outcomes[index] = json.load(f)
            else:
                outcomes[index] = {"error": f"the estimate ended without a result (wait status {status})"}
    return outcomes
