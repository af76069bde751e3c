"""Retrying a call that can fail for a moment (a flaky network, a busy sqlite store)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def retrying(call: Callable[[], T], *, retries: int, delay: float, max_delay: float = 30.0,
             transient: Callable[[BaseException], bool]) -> T:
    """``call()``, again after ``delay``, ``2 * delay``, ... (at most ``max_delay``) while it raises a transient error.

    At most ``retries`` extra attempts; the last error, or one that
    ``transient`` rejects, propagates unchanged.
    """
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as err:
            if attempt == retries or not transient(err):
                raise
            time.sleep(min(delay * (2**attempt), max_delay))
    raise AssertionError("unreachable")
