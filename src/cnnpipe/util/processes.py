"""Other processes on this machine."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host.

    Only "no such process" counts as dead: a process we may not signal
    (another user's) or any other error counts as alive, so a caller that
    cleans up after dead processes never touches a live one's runs.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True
