"""The policy every MLflow call follows: retry a locked sqlite, let a Ctrl-C wait for the call, fail in one line.

A KeyboardInterrupt raised mid-call leaves MLflow's SQLAlchemy session open,
holding the sqlite write lock, so the KILLED status written next waited on its
own process and was lost; so a Ctrl-C waits for the call (a second one stops
at once). ``sqlite3.OperationalError: database is locked`` under concurrent
writers is retried briefly (``util.retry``). Any other failure is one
``TrackingError`` line, or, mid-training (``keep_going``), one note after
which every later call is skipped: losing the store must not lose the
training.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

from cnnpipe.util.errors import TrackingError
from cnnpipe.util.retry import retrying
from cnnpipe.util.text import one_line

LOCK_RETRIES = 4
LOCK_DELAY_S = 0.25


@contextlib.contextmanager
def ctrl_c_after_the_call() -> Iterator[None]:
    """Hold a Ctrl-C that lands inside one MLflow call until the call returns; a second one stops at once.

    A KeyboardInterrupt raised mid-call leaves MLflow's SQLAlchemy session open
    while the traceback is alive, holding the sqlite write lock, so the KILLED
    status written next waited on its own process and was lost (the
    parent stayed RUNNING). Calls take milliseconds; a stuck one (a server that
    does not answer) still stops on the second Ctrl-C.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    held: list[Any] = []

    def hold(signum: int, frame: Any) -> None:
        held.append(frame)
        signal.signal(signal.SIGINT, previous)  # the next Ctrl-C interrupts the call itself

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            previous(signal.SIGINT, held[0])




def _locked(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and "locked" in str(err).lower()


class CallPolicy:
    """What a tracker does around each call: ``uri`` names the store, ``keep_going`` chooses fail or note."""

    uri: str
    keep_going: bool
    lost: str | None

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` under the policy; None once the store was lost (``keep_going``)."""
        from mlflow.exceptions import MlflowException

        if self.lost is not None:
            return None

        def once() -> Any:
            with ctrl_c_after_the_call():
                return fn(*args, **kwargs)

        try:
            return retrying(once, retries=LOCK_RETRIES, delay=LOCK_DELAY_S, transient=_locked)
        except MlflowException as err:
            return self.failed(f"MLflow {what} failed at {self.uri}: {one_line(err.message, 300)}")
        except OSError as err:
            return self.failed(f"MLflow {what} failed at {self.uri}: {one_line(err, 300)}")

    def failed(self, message: str) -> None:
        """Raise the one-line TrackingError, or (``keep_going``) remember it and stop logging."""
        if not self.keep_going:
            raise TrackingError(f"{message}; check the store or set mlflow.enabled: false")
        self.lost = message
        print(f"mlflow: {message}; training goes on without tracking", file=sys.stderr, flush=True)
