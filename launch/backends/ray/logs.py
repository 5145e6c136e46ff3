"""A Ray job's driver log, labelled: Ray prefixes each worker's lines `(<name> pid=<pid>, ip=<address>)`; the
ranks' pids in provenance turn that into the node and rank."""

from __future__ import annotations

import re
from collections.abc import Callable

COLOR = r"(?:\x1b\[[0-9;]*m)*"  # Ray colours the prefix when its driver writes to a terminal
RAY_PREFIX = re.compile(COLOR + r"\((?:[A-Za-z_][\w.]* )?pid=(\d+)(?:, ip=([0-9A-Fa-f.:]+))?\) ?" + COLOR + " ?")


def ray_label(ranks: object) -> Callable[[str], str]:
    """Labels the Ray workers' lines of a job log `[<node> rank <r>]` by their pid (from provenance), else by
    their node's address; the driver's own lines stay as they are."""
    by_pid = {
        r["pid"]: (r["rank"], r["host"])
        for r in (ranks if isinstance(ranks, list) else [])
        if isinstance(r, dict) and isinstance(r.get("pid"), int) and isinstance(r.get("rank"), int)
    }

    def label(line: str) -> str:
        m = RAY_PREFIX.match(line)
        if m is None:
            return line
        rest = line[m.end() :]
        pid = int(m.group(1))
        if pid in by_pid:
            rank, host = by_pid[pid]
            return f"[{host} rank {rank}] {rest}"
        return f"[{m.group(2) or 'pid ' + m.group(1)}] {rest}"

    return label
