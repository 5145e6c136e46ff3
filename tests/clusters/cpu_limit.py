"""A node made slow on purpose: chosen processes moved into a cgroup with a CPU quota (cgroup v1's `cpu` hierarchy,
else cgroup v2 with the cpu controller), and moved back to the root group when the limit is lifted. As root."""

from __future__ import annotations

import contextlib
import errno
import secrets
import time
from pathlib import Path

from tests.clusters import unavailable

V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")
PERIOD_US = 100_000
LEAVE_S = 30.0  # how long an exiting process may keep the limited group busy when the limit is lifted


def hierarchy() -> tuple[Path, str]:
    """The root of a cgroup hierarchy with a CPU quota, and its version ("v1" or "v2"); skip/fail when none."""
    if (V1 / "cpu.cfs_quota_us").exists() or (V1 / "cgroup.procs").exists():
        return V1, "v1"
    controllers = V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return V2, "v2"
    unavailable("no cgroup hierarchy with a CPU quota (cgroup v1 cpu, or v2 with the cpu controller)")
    raise AssertionError("unreachable")


class CpuLimit:
    """`with CpuLimit(0.1) as limit: limit.add(pid)`: the processes added get at most that share of one CPU."""

    def __init__(self, share: float) -> None:
        self.root, self.version = hierarchy()
        self.group = self.root / f"extrema-slow-{secrets.token_hex(3)}"
        self.quota_us = max(1000, int(share * PERIOD_US))

    def __enter__(self) -> CpuLimit:
        self.group.mkdir()
        if self.version == "v1":
            (self.group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.group / "cpu.cfs_quota_us").write_text(str(self.quota_us))
        else:
            with contextlib.suppress(OSError):  # already enabled, or the root keeps it to itself
                (self.root / "cgroup.subtree_control").write_text("+cpu")
            (self.group / "cpu.max").write_text(f"{self.quota_us} {PERIOD_US}")
        return self

    def add(self, pid: int) -> None:
        """Move the process (all its threads) into the limited group."""
        (self.group / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        """The processes in the limited group now."""
        return [int(p) for p in (self.group / "cgroup.procs").read_text().split()]

    def __exit__(self, *exc: object) -> None:
        """Move every process back to the root group and remove the limited one; a process still exiting keeps the
        group busy (it cannot be moved, EBUSY on removal) until it is gone: tried again for up to LEAVE_S."""
        deadline = time.monotonic() + LEAVE_S
        while True:
            for pid in self.pids():
                with contextlib.suppress(OSError):  # it exited meanwhile, or is exiting
                    (self.root / "cgroup.procs").write_text(str(pid))
            try:
                self.group.rmdir()
                return
            except OSError as e:
                if e.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)
