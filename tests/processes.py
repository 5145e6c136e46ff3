"""Child processes for tests that signal them as a terminal would."""

from __future__ import annotations

import signal


def interruptible() -> None:
    """Give a child the default SIGINT action (a `preexec_fn`): a test suite started in the background inherits
    SIGINT ignored, and a Python child that starts with it ignored never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def end_world() -> None:
    """Destroy the gloo world a test process set up itself, as the stages release theirs (`release_world`): DTensor's
    caches, which hold FSDP2's device mesh and so the group, go first, so that destroying the group joins gloo's
    threads while the interpreter is whole (otherwise: SIGABRT at exit, "terminate called without an active
    exception")."""
    import gc

    import torch.distributed as dist

    from extrema.train.dist import drop_mesh_caches

    drop_mesh_caches()
    gc.collect()
    dist.destroy_process_group()
