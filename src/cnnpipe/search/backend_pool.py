"""The process-pool backend: a grid's runs in spawned worker processes of this machine.

Each worker is pinned to its planned torch threads (``compute.parallelism``),
ignores Ctrl-C (the parent stops the pool and marks runs KILLED), maps the
prepared folder once (``trial_data.PreparedSource``) and sends its progress
events to the parent through a queue. A worker the OS kills (usually out of
memory) is one ``WorkerDied`` line, not a hang.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.compute.parallelism import pin_threads, spread
from cnnpipe.data.prepared import known_digests
from cnnpipe.search.backend import POLL_S, Event, drain_events
from cnnpipe.search.trial_data import DataSource, InlineSource, PreparedSource
from cnnpipe.util.errors import CnnpipeError

if TYPE_CHECKING:
    from cnnpipe.engine.data import TrainData


class WorkerDied(CnnpipeError):
    """A worker process vanished (killed by the OS, usually out of memory)."""


_EMIT_QUEUE: Any = None  # set in each pool worker by _init_worker


def _init_worker(threads: int, events: Any) -> None:
    """Pool worker start: Ctrl-C is the parent's business; pin threads; keep the event queue."""
    global _EMIT_QUEUE
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pin_threads(threads)
    _EMIT_QUEUE = events


def _pool_call(fn: Callable[..., Any], item: tuple[Any, ...], with_emit: bool) -> Any:
    """One run in a pool worker, its events going to the queue ``_init_worker`` kept."""
    if with_emit:
        return fn(*item, emit=_EMIT_QUEUE.put)
    return fn(*item)


class ProcessExecutor:
    """Runs in ``workers`` spawned processes of this machine, each pinned to ``threads`` torch threads.

    ``spread_threads``: a ``map`` over fewer items than workers (halving's
    last rungs) pins its processes to the idle workers' cores too. Faster,
    but a trial's float summation order then depends on its rung's size, so
    it is off by default (survivors stay bitwise equal to the exhaustive grid).
    """

    parallel = True

    def __init__(self, workers: int, threads: int, *, spread_threads: bool = False) -> None:
        self.workers = workers
        self.threads = threads
        self.spread_threads = spread_threads
        self.description = f"{workers} worker processes x {threads} torch thread(s)"

    def threads_for(self, tasks: int) -> int:
        return spread(self.workers, self.threads, tasks) if self.spread_threads else self.threads

    def start(self) -> None:
        """Nothing to start before ``map`` (the pool lives only as long as one ``map``)."""

    def stop(self) -> None:
        """Nothing to stop (each ``map`` shuts its pool down)."""

    def data_source(self, data: TrainData, folder: Path | None) -> DataSource:
        if folder is None:
            return InlineSource(data)
        return PreparedSource(Path(folder).resolve(), data.fingerprint, tuple(known_digests(folder)))

    def map(self, fn: Callable[..., Any], items: Iterable[tuple[Any, ...]],
            on_event: Callable[[Event], None] | None = None) -> Iterator[Any]:
        items = list(items)
        if not items:
            return
        mp = multiprocessing.get_context("spawn")  # fork + torch threads/CUDA is unsafe
        events = mp.Queue() if on_event is not None else None
        threads = self.threads_for(len(items))
        pool = ProcessPoolExecutor(max_workers=min(self.workers, len(items)), mp_context=mp,
                                   initializer=_init_worker, initargs=(threads, events))
        finished = False
        try:
            pending = {pool.submit(_pool_call, fn, item, on_event is not None) for item in items}
            while pending:
                done, pending = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED)
                drain_events(events, on_event)
                for future in done:
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        raise WorkerDied("a grid worker process died (killed by the OS, often out of memory); "
                                         "lower grid.workers or set grid.workers: 1") from None
                    yield result
            finished = True
        finally:
            if not finished:
                _stop_pool(pool)
                with contextlib.suppress(Exception):
                    drain_events(events, on_event)  # runs that started before the stop still get recorded
            pool.shutdown(wait=True, cancel_futures=True)
            if events is not None:
                events.close()
                events.cancel_join_thread()


def _stop_pool(pool: Any) -> None:
    """Cancel queued runs and terminate the running ones (workers ignore SIGINT).

    The worker list is read before ``shutdown``, which forgets it; Python
    3.14's ``terminate_workers()`` does the same publicly.
    """
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.terminate()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(timeout=5)
