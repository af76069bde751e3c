"""How many runs train at once, with how many torch threads each: one plan for every backend.

A run's thread count decides its float summation order, so the plan is made
here once and every backend (this process, a process pool, Ray) follows it:
the same params, cores and ``grid.workers`` give bitwise-equal results
whichever backend runs them. ``pin_threads`` applies the plan inside a worker.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import contextlib
import os

from cnnpipe.compute.device import default_threads


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


def spread(workers: int, threads: int, tasks: int) -> int:
    """Threads per task when ``tasks`` < ``workers``: the idle workers' cores go to the running tasks."""
    return max(threads, workers * threads // max(1, tasks)) if tasks < workers else threads


def cpu_cores() -> int:
    """The cores this process may use (its CPU affinity: a container's or ``taskset``'s limit holds)."""
    return default_threads()


def pin_threads(threads: int) -> None:
    """Give torch ``threads`` intra-op threads and one inter-op thread (workers share the cores)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch  # here, not at the top: planning (and the train stage's --help) must not pay for torch

    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # only allowed before the first parallel region
        torch.set_num_interop_threads(1)
