"""Child processes for tests that signal them as a terminal would."""

from __future__ import annotations

import signal


def interruptible() -> None:
    """Give a child the default SIGINT action (a `preexec_fn`): a test suite started in the background inherits
    SIGINT ignored, and a Python child that starts with it ignored never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
