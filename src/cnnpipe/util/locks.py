"""Inter-process locks on files (``filelock``: an ``flock`` on Unix, dropped by the kernel when the holder dies).

Three jobs use them: the MLflow store's first use (schema creation), the
claim on a trial's run state, and the machine's compute turn. A lock held by
another process of this machine blocks; so does one held through another
``FileLock`` object of this process (each opens its own descriptor).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from filelock import FileLock, Timeout


def file_lock(path: str | Path) -> FileLock:
    """A lock on ``path`` (its folder is created; the file itself stays after release)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(target))


@contextlib.contextmanager
def held(path: str | Path, *, on_wait: Callable[[], None] | None = None) -> Iterator[FileLock]:
    """Hold the lock on ``path`` for the block, waiting as long as it takes; ``on_wait()`` runs once if we wait."""
    lock = file_lock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if on_wait is not None:
            on_wait()
        lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def try_hold(path: str | Path) -> FileLock | None:
    """The lock on ``path`` if it is free now (the caller releases it), else None."""
    lock = file_lock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock
