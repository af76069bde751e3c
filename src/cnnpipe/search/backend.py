"""What every backend (where a grid's runs execute) does, and the events its workers send back.

Every backend does one thing: call ``fn(*item)`` for each item and yield the
results as runs complete. With ``on_event``, ``fn`` also gets ``emit=``: a
callable that carries small progress events (a run started, an epoch ended)
back to the parent, which hands them to ``on_event`` in its own thread.

Why events and not workers logging to MLflow themselves: the parent is then
the ONLY process that writes to the tracking store. A sqlite store never sees
concurrent writers, a Ray worker on another machine needs no access to it,
and workers never import mlflow (its import time: benchmarks/README.md).
Ctrl-C is handled once, in the parent: workers ignore SIGINT, the parent
stops them and marks runs KILLED.

The backends: ``backend_sequential`` (this process), ``backend_pool`` (local
worker processes), ``backend_ray`` (Ray tasks); ``backend_choice`` picks one
from ``grid.backend`` / ``grid.workers``. Where workers get their data:
``trial_data``.

Nothing here imports torch or ray at module level.
"""

from __future__ import annotations

import queue as queue_mod
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from cnnpipe.engine.data import TrainData
    from cnnpipe.search.trial_data import DataSource

Event = tuple[Any, ...]
Emit = Callable[[Event], None]
POLL_S = 0.1  # how often a parallel backend's parent wakes to pass events on while it waits for results


class Executor(Protocol):
    """Runs ``fn(*item)`` (plus ``emit=`` when ``on_event`` is given); yields results as runs complete."""

    workers: int
    parallel: bool
    description: str

    def start(self) -> None:
        """Acquire what runs need before any data is loaded (Ray: connect); idempotent."""
        ...

    def stop(self) -> None:
        """Release it after the last ``map`` (successive halving maps once per rung); idempotent."""
        ...

    def data_source(self, data: TrainData, folder: Path | None) -> DataSource | None: ...

    def threads_for(self, tasks: int) -> int | None:
        """Torch threads each of ``tasks`` runs in one ``map`` gets (more when ``grid.spread_threads``)."""
        ...

    def map(self, fn: Callable[..., Any], items: Iterable[tuple[Any, ...]],
            on_event: Callable[[Event], None] | None = None) -> Iterator[Any]: ...


def drain_events(events: Any, on_event: Callable[[Event], None] | None,
                 get: Callable[[], Any] | None = None) -> None:
    """Hand every queued event to ``on_event`` (in this, the parent's, thread)."""
    if events is None or on_event is None:
        return
    get = get or events.get_nowait
    while True:
        try:
            event = get()
        except (queue_mod.Empty, EOFError, OSError, ValueError):
            return
        on_event(event)
