"""Where a grid's runs execute: this process, a local process pool, or Ray.

Every backend does one thing: call ``fn(*item)`` for each item and yield the
results as runs complete. With ``on_event``, ``fn`` also gets ``emit=``: a
callable that carries small progress events (a run started, an epoch ended)
back to the parent, which hands them to ``on_event`` in its own thread.

Why events and not workers logging to MLflow themselves: the parent is then
the ONLY process that writes to the tracking store. A sqlite store never sees
concurrent writers, a Ray worker on another machine needs no access to it,
and workers never import mlflow (~3 s each). Ctrl-C is handled once, in the
parent: workers ignore SIGINT, the parent stops them and marks runs KILLED.

Workers get their data from a ``DataSource``, not a pickle of the tensors:
``PreparedSource`` maps the prepared folder (memory-mapped safetensors:
the workers of one machine share one copy in the page cache, none holds a
private one) once per worker process, trusting the content hashes the
parent already computed for the same files (same inode, size and mtime); ``RaySource`` falls back to a copy in Ray's
object store when the folder does not exist on that node (a cluster).

Nothing here imports torch or ray at module level.
"""

from __future__ import annotations

import contextlib
import os
import queue as queue_mod
import signal
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cnnpipe.util.errors import CnnpipeError, DataError

if TYPE_CHECKING:
    from cnnpipe.engine.data import TrainData
    from cnnpipe.params.sections import GridParams

Event = tuple[Any, ...]
Emit = Callable[[Event], None]
POLL_S = 0.1
RAY_MISSING = "grid.backend is ray but ray is not installed; pip install 'cnnpipe[ray]'"


class WorkerDied(CnnpipeError):
    """A worker process vanished (killed by the OS, usually out of memory)."""


class ClusterError(CnnpipeError):
    """The Ray cluster in ``grid.ray_address`` cannot be reached or refused the connection."""


# --------------------------------------------------------------------------- data for workers


_LOADED: dict[tuple[str, str], "TrainData"] = {}  # per process: a worker trains many runs on one load


def _load_prepared(folder: Path, fingerprint: str, digests: tuple[Any, ...] = ()) -> "TrainData":
    from cnnpipe.data.prepared import trust_digests
    from cnnpipe.engine.data import TrainData

    key = (str(folder), fingerprint)
    if key not in _LOADED:
        trust_digests(list(digests))
        data = TrainData.load(folder, splits=("train", "val"))
        if data.fingerprint != fingerprint:
            raise DataError(f"{folder} changed while the grid was running (fingerprint {data.fingerprint}, "
                            f"expected {fingerprint}); re-run the train stage")
        _LOADED.clear()
        _LOADED[key] = data
    return _LOADED[key]


@dataclass(frozen=True)
class PreparedSource:
    """The prepared folder a worker maps (verified) instead of receiving pickled tensors.

    ``digests``: the parent's ``known_digests`` of the folder's split files,
    so each worker skips re-hashing gigabytes the parent hashed already.
    """

    folder: Path
    fingerprint: str
    digests: tuple[Any, ...] = ()

    def load(self) -> "TrainData":
        return _load_prepared(self.folder, self.fingerprint, self.digests)


@dataclass(frozen=True)
class InlineSource:
    """The data itself, pickled (for a ``TrainData`` that has no folder, e.g. built in a test)."""

    data: "TrainData"

    def load(self) -> "TrainData":
        return self.data


@dataclass(frozen=True)
class RaySource:
    """The folder when this node has it (same fingerprint), else Ray's object-store copy."""

    folder: Path
    fingerprint: str
    refs: list[Any] = field(default_factory=list)  # [ObjectRef] in a list: Ray does not resolve it eagerly

    def load(self) -> "TrainData":
        from cnnpipe.data.prepared import load_stats

        with contextlib.suppress(Exception):
            if load_stats(self.folder).fingerprint == self.fingerprint:
                return _load_prepared(self.folder, self.fingerprint)
        import ray

        return ray.get(self.refs[0])


class DataSource(Protocol):
    def load(self) -> "TrainData": ...


# --------------------------------------------------------------------------- the executors


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

    def data_source(self, data: "TrainData", folder: Path | None) -> DataSource | None: ...

    def threads_for(self, tasks: int) -> int | None:
        """Torch threads each of ``tasks`` runs in one ``map`` gets (more when ``grid.spread_threads``)."""
        ...

    def map(self, fn: Callable[..., Any], items: Iterable[tuple[Any, ...]],
            on_event: Callable[[Event], None] | None = None) -> Iterator[Any]: ...


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

    def data_source(self, data: "TrainData", folder: Path | None) -> DataSource | None:
        return None  # runs see the parent's TrainData directly

    def map(self, fn: Callable[..., Any], items: Iterable[tuple[Any, ...]],
            on_event: Callable[[Event], None] | None = None) -> Iterator[Any]:
        for item in items:
            with _threads(self.threads):
                result = fn(*item, emit=on_event) if on_event is not None else fn(*item)
            yield result


def _threads(threads: int | None) -> contextlib.AbstractContextManager[Any]:
    if threads is None:
        return contextlib.nullcontext()
    from cnnpipe.compute.device import thread_limit

    return thread_limit(threads)


# ---- local process pool

_EMIT_QUEUE: Any = None  # set in each pool worker by _init_worker


def pin_threads(threads: int) -> None:
    """Give torch ``threads`` intra-op threads and one inter-op thread (workers share the cores)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only allowed before the first parallel region
        torch.set_num_interop_threads(1)


def _init_worker(threads: int, events: Any) -> None:
    """Pool worker start: Ctrl-C is the parent's business; pin threads; keep the event queue."""
    global _EMIT_QUEUE
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pin_threads(threads)
    _EMIT_QUEUE = events


def _pool_call(fn: Callable[..., Any], item: tuple[Any, ...], with_emit: bool) -> Any:
    if with_emit:
        return fn(*item, emit=_EMIT_QUEUE.put)
    return fn(*item)


def _drain(events: Any, on_event: Callable[[Event], None] | None, get: Callable[[], Any] | None = None) -> None:
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


def spread(workers: int, threads: int, tasks: int) -> int:
    """Threads per task when ``tasks`` < ``workers``: the idle workers' cores go to the running tasks."""
    return max(threads, workers * threads // max(1, tasks)) if tasks < workers else threads


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

    def data_source(self, data: "TrainData", folder: Path | None) -> DataSource:
        if folder is None:
            return InlineSource(data)
        from cnnpipe.data.prepared import known_digests

        return PreparedSource(Path(folder).resolve(), data.fingerprint, tuple(known_digests(folder)))

    def map(self, fn: Callable[..., Any], items: Iterable[tuple[Any, ...]],
            on_event: Callable[[Event], None] | None = None) -> Iterator[Any]:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

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
                _drain(events, on_event)
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
                    _drain(events, on_event)  # runs that started before the stop still get recorded
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


# ---- Ray


def ray_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("ray") is not None


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
                # the same core count as the local backend (the affinity mask: containers, taskset);
                # "local": a new instance, never the last `ray start` cluster of this machine that
                # ray.init() would otherwise attach to (with num_cpus, that attach fails)
                ray.init(address="local", num_cpus=cpu_cores(), include_dashboard=False, log_to_driver=False)
                self._started = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        per_node = max([int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")] or [cpus])
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

    def data_source(self, data: "TrainData", folder: Path | None) -> DataSource:
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
                    _drain(events, on_event, get=lambda: events.get_nowait())
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
                        _drain(events, on_event, get=lambda: events.get_nowait())
            if events is not None:
                with contextlib.suppress(Exception):
                    events.shutdown()


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``ray://host:port``; None for ``auto`` and other forms."""
    rest = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def connect_ray(address: str, timeout_s: float = 5.0) -> None:
    """``ray.init(address)``, with a one-line ``ClusterError`` instead of Ray's retries, traceback and exit.

    A TCP check first: an address where nothing listens would otherwise keep
    Ray retrying for minutes and then exit the process. Ray 2.60 refuses a
    driver without the cluster's token when token authentication is on, and
    never turns it on by itself for an explicit address.
    """
    import ray

    where = _host_port(address)
    if where is not None:
        try:
            socket.create_connection(where, timeout=timeout_s).close()
        except OSError as err:
            reason = err.strerror or str(err) or type(err).__name__
            raise ClusterError(f"cannot reach the Ray cluster at grid.ray_address {address} ({reason}); "
                               f"start it (ray start --head --port={where[1]}) or fix grid.ray_address") from None
    try:
        ray.init(address=address, log_to_driver=False)
    except (Exception, SystemExit) as err:  # Ray exits (SystemExit) when the address never answers
        with contextlib.suppress(Exception):
            ray.shutdown()
        if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
            fix = ("RAY_AUTH_MODE=token is set: check that RAY_AUTH_TOKEN (or ~/.ray/auth_token) holds the "
                   "cluster's token (`ray get-auth-token` on the head)")
        else:
            fix = ("a cluster with token authentication (Ray 2.60 `ray start --head` when the head has a token) "
                   "needs RAY_AUTH_MODE=token and RAY_AUTH_TOKEN=<`ray get-auth-token` on the head>; "
                   "else check the address and `ray status` on the head")
        detail = " ".join(str(err).split())[:160] or type(err).__name__
        raise ClusterError(f"the Ray cluster at grid.ray_address {address} refused the connection ({detail}); "
                           f"{fix}") from None


# --------------------------------------------------------------------------- choosing


def plan_parallelism(requested: int | str, runs: int, cores: int) -> tuple[int, int]:
    """``(runs at once, torch threads per run)``: ``auto`` = one run per core, at most one per run.

    The cores are shared evenly: ``cores // workers`` threads per run, also
    when that is one run at a time in this process. A run's thread count
    decides its float summation order, so it is planned here once for every
    backend: the same params, cores and ``grid.workers`` give bitwise-equal
    results whichever executor runs them.
    """
    want = min(runs, cores) if requested == "auto" else int(requested)
    workers = max(1, min(want, runs))
    return workers, max(1, cores // workers)


def cpu_cores() -> int:
    """The cores this process may use (its CPU affinity: a container's or ``taskset``'s limit holds)."""
    from cnnpipe.compute.device import default_threads

    return default_threads()


def make_executor(settings: "GridParams", runs: int, *, device: str = "cpu", cores: int | None = None) -> Executor:
    """The executor ``grid.backend`` / ``grid.workers`` ask for.

    local: ``auto`` is one process per core (at most one per run), each with
    ``cores // workers`` torch threads; on a GPU ``auto`` is 1 (runs would
    only queue for the same device). One worker means no pool at all: runs
    go one after another in this process, with all ``cores`` threads.
    ray: checked here (without importing ray), so a missing extra is one
    line before any data is loaded.
    """
    if settings.backend == "ray":
        if not ray_installed():
            raise CnnpipeError(RAY_MISSING)
        return RayExecutor(settings.ray_address, settings.workers, runs, gpu=device.startswith("cuda"),
                           spread_threads=settings.spread_threads)
    cores = cores or cpu_cores()
    requested = settings.workers
    if requested == "auto" and device.startswith("cuda"):
        requested = 1
    workers, threads = plan_parallelism(requested, runs, cores)
    if workers <= 1:
        return SequentialExecutor(threads)
    return ProcessExecutor(workers, threads, spread_threads=settings.spread_threads)
