"""The Ray backend: each grid point a Ray task, on a cluster or on a local Ray started for the grid.

Connecting (and the one-line errors when a cluster cannot be reached) is
``compute.ray_cluster``'s job; this module plans the runs from the cluster's
CPUs, submits at most ``workers`` tasks at once, and relays the tasks'
progress events through a Ray queue. Workers get their data from a
``trial_data.RaySource``: the node's own prepared folder, else Ray's
object-store copy.

Nothing here imports ray at module level.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.compute.parallelism import pin_threads, plan_parallelism, spread
from cnnpipe.compute.ray_cluster import cluster_cpus, connect_ray, start_local_ray
from cnnpipe.search.backend import POLL_S, Event, drain_events
from cnnpipe.search.trial_data import DataSource, RaySource

if TYPE_CHECKING:
    from cnnpipe.engine.data import TrainData


def _ray_call(fn: Callable[..., Any], item: tuple[Any, ...], events: Any, threads: int) -> Any:
    """A Ray task: same thread pinning and events as a pool worker."""
    pin_threads(threads)
    if events is not None:
        return fn(*item, emit=events.put)
    return fn(*item)


class RayExecutor:
    """Runs each grid point as a Ray task on ``ray.init(address)``, or on a local Ray it starts and stops.

    ``workers`` caps the runs at once (``auto``: as many as the CPUs allow);
    each task asks Ray for ``threads`` CPUs (and one GPU when training on CUDA).
    """

    parallel = True

    def __init__(self, address: str | None, workers: int | str, runs: int, *, gpu: bool = False,
                 spread_threads: bool = False) -> None:
        self.address = address
        self.spread_threads = spread_threads and not gpu
        self.requested = workers
        self.runs = runs
        self.gpu = gpu
        self.workers = 1
        self.threads = 1
        self.per_node = 1
        self._started = False
        where = f"Ray cluster {address}" if address else "a local Ray"
        self.description = f"Ray tasks on {where}"

    # -- lifecycle

    def start(self) -> None:
        """Connect (or start a local Ray) and plan; a cluster that is unreachable or refuses us is one line."""
        import ray

        if not ray.is_initialized():
            if self.address:
                connect_ray(self.address)
            else:
                start_local_ray()
                self._started = True
        cpus, per_node = cluster_cpus()
        self.workers, self.threads = plan_parallelism(self.requested, self.runs, max(1, cpus))
        self.threads = max(1, min(self.threads, per_node))
        self.per_node = max(1, per_node)
        self.description = (f"Ray tasks on {'cluster ' + self.address if self.address else 'a local Ray'} "
                            f"({cpus} CPUs): up to {self.workers} at once x {self.threads} CPU(s)")

    def threads_for(self, tasks: int) -> int:
        if not self.spread_threads:
            return self.threads
        return min(spread(self.workers, self.threads, tasks), self.per_node)

    def stop(self) -> None:
        if self._started:
            import ray

            with contextlib.suppress(Exception):
                ray.shutdown()
            self._started = False

    def data_source(self, data: TrainData, folder: Path | None) -> DataSource:
        import ray

        self.start()
        return RaySource(Path(folder).resolve() if folder is not None else Path("/nonexistent"),
                         data.fingerprint, [ray.put(data)])

    def map(self, fn: Callable[..., Any], items: Iterable[tuple[Any, ...]],
            on_event: Callable[[Event], None] | None = None) -> Iterator[Any]:
        import ray
        from ray.exceptions import RayTaskError

        items = list(items)
        if not items:
            return
        self.start()
        events = None
        if on_event is not None:
            from ray.util.queue import Queue

            events = Queue(actor_options={"num_cpus": 0})
        threads = self.threads_for(len(items))
        task = ray.remote(_ray_call).options(num_cpus=threads, num_gpus=1 if self.gpu else 0, max_retries=0)
        # Submit no more than `workers` at once, so `workers` really caps the runs in flight.
        todo = list(items)
        pending: list[Any] = []
        finished = False

        def submit() -> None:
            while todo and len(pending) < self.workers:
                pending.append(task.remote(fn, todo.pop(0), events, threads))

        try:
            submit()
            while pending:
                ready, rest = ray.wait(pending, num_returns=1, timeout=POLL_S)
                pending[:] = rest
                if events is not None:
                    drain_events(events, on_event, get=lambda: events.get_nowait())
                for ref in ready:
                    try:
                        result = ray.get(ref)
                    except RayTaskError as err:
                        cause = getattr(err, "cause", None)
                        if isinstance(cause, BaseException):
                            raise cause from None
                        raise
                    yield result
                submit()
            finished = True
        finally:
            if not finished:
                for ref in pending:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)
                if events is not None:
                    with contextlib.suppress(Exception):
                        drain_events(events, on_event, get=lambda: events.get_nowait())
            if events is not None:
                with contextlib.suppress(Exception):
                    events.shutdown()
