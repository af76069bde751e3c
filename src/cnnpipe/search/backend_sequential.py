"""The in-process backend: a grid's runs one after another in this process.

The choice for ``grid.workers: 1`` and on a GPU (the GPU is the bottleneck:
parallel runs would only queue for it). Runs see the parent's ``TrainData``
directly, so no data source is needed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.compute.device import thread_limit
from cnnpipe.search.backend import Event

if TYPE_CHECKING:
    from cnnpipe.engine.data import TrainData
    from cnnpipe.search.trial_data import DataSource


class SequentialExecutor:
    """One run after another in this process (also the choice on a GPU: it is the bottleneck).

    ``threads``: torch intra-op threads for each run (``None``: leave torch's
    setting alone). ``make_executor`` passes the same count a pool worker
    would get for the same cores and ``grid.workers``, so the arithmetic (and
    with it every bit of the result) does not depend on the backend.
    """

    workers = 1
    parallel = False

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self.description = "one run at a time in this process" + (f" x {threads} torch thread(s)" if threads else "")

    def threads_for(self, tasks: int) -> int | None:
        return self.threads

    def start(self) -> None:
        """Nothing to start (the Ray backend connects here)."""

    def stop(self) -> None:
        """Nothing to stop."""

    def data_source(self, data: TrainData, folder: Path | None) -> DataSource | None:
        return None  # runs see the parent's TrainData directly

    def map(self, fn: Callable[..., Any], items: Iterable[tuple[Any, ...]],
            on_event: Callable[[Event], None] | None = None) -> Iterator[Any]:
        for item in items:
            with _threads(self.threads):
                result = fn(*item, emit=on_event) if on_event is not None else fn(*item)
            yield result


def _threads(threads: int | None) -> contextlib.AbstractContextManager[Any]:
    """``thread_limit(threads)``, or nothing at all when ``threads`` is None (torch is not even imported)."""
    if threads is None:
        return contextlib.nullcontext()
    return thread_limit(threads)
