"""Which backend runs the grid: ``grid.backend`` / ``grid.workers`` (and the device) -> an executor.

The one place that turns the grid params into a backend, so the train stage
and the benchmarks build exactly what the user asked for. A missing Ray extra
is one line here, before any data is loaded.

Nothing here imports torch or ray at module level.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cnnpipe.compute.parallelism import cpu_cores, plan_parallelism
from cnnpipe.compute.ray_cluster import RAY_MISSING, ray_installed
from cnnpipe.search.backend import Executor
from cnnpipe.search.backend_pool import ProcessExecutor
from cnnpipe.search.backend_ray import RayExecutor
from cnnpipe.search.backend_sequential import SequentialExecutor
from cnnpipe.util.errors import CnnpipeError

if TYPE_CHECKING:
    from cnnpipe.params.sections import GridParams


def make_executor(settings: GridParams, runs: int, *, device: str = "cpu", cores: int | None = None) -> Executor:
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
