"""The search loop of the train stage: reuse, resume, rungs, and the executor.

A search is a ``SearchSession`` (one MLflow/progress log, one executor, one
compute turn) that runs one or more *batches* of trials, each trial keeping
its global index. The exhaustive grid and successive halving are one batch of
every config (``run_search``); a model-based search (``search.ask_tell``)
runs a batch, learns from its results, and asks the next.

A batch first takes every finished trial from the run cache, then trains the
rest rung by rung (the exhaustive grid is one rung to the end) on a backend
(``search.backend_choice``: sequential, local processes, Ray). Each trial
continues from its saved run state, so a killed search resumes where it
stopped and a promoted trial never retrains an epoch. A failed trial is
recorded and the search goes on; a ``CnnpipeError`` in a trial stops it (that
child FAILED, the others KILLED) and propagates, and so does Ctrl-C.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.compute.turns import compute_turn
from cnnpipe.util.errors import DataError
from cnnpipe.search.backend import Executor
from cnnpipe.search.backend_sequential import SequentialExecutor
from cnnpipe.params.run_config import RunConfig
from cnnpipe.params.schema import Params
from cnnpipe.search.log import SearchLog
from cnnpipe.search.search_progress import SearchProgress
from cnnpipe.util.env import progress_bars
from cnnpipe.search.selection import RunRecord
from cnnpipe.util.text import one_line
from cnnpipe.search.strategies import Exhaustive, SuccessiveHalving, promote
from cnnpipe.search.trial import RunError, TrainContext, run_one
from cnnpipe.tracking.runs import NullTracker

if TYPE_CHECKING:
    from cnnpipe.engine.data import TrainData
    from cnnpipe.store.run_cache import CachedRun, GridCache
    from cnnpipe.store.states import RunStateStore


def check_dataset(data: "TrainData", params: Params) -> None:
    """Refuse to train on prepared data of another dataset than ``data.dataset`` names."""
    if data.dataset and data.dataset != params.data.dataset:
        raise DataError(
            f"data/prepared holds {data.dataset} but params.yaml has data.dataset: {params.data.dataset}; "
            "run dvc repro (or dvc repro prepare) first"
        )


@dataclass
class SearchPlan:
    """What a batch's first line reports: trials reused from the cache and resumed from state."""

    cached: dict[int, tuple["CachedRun", Any]]
    resumed: dict[int, int]  # index -> saved epoch


def plan_search(configs: Sequence[RunConfig] | Mapping[int, RunConfig], log: SearchLog) -> SearchPlan:
    """Look every trial up in the run cache, then in the run states (a sequence is indexed from 1)."""
    items = configs.items() if isinstance(configs, Mapping) else enumerate(configs, start=1)
    cached, resumed = {}, {}
    for index, cfg in items:
        found = log.lookup(cfg)
        if found is not None:
            cached[index] = found
            continue
        folder = log.claim_state(cfg)
        if folder is not None and log.states is not None:
            if log.cache is not None and not log.cache.reuse:  # --no-cache: retrain from scratch
                log.states.discard(folder)
                continue
            epoch = log.states.saved_epoch(folder)
            if epoch:
                resumed[index] = epoch
    return SearchPlan(cached, resumed)


def plan_counts(plan: SearchPlan, cache: "GridCache | None") -> str:
    """``2 reused from the cache, 1 resumed`` (or why nothing could be reused)."""
    reused = f"{len(plan.cached)} reused from the cache" if cache is not None and cache.reuse else \
        "cache not reused" if cache is not None else "cache off"
    return f"{reused}, {len(plan.resumed)} resumed"


class SearchSession:
    """One search's shared machinery: the log (MLflow, cache, states), progress, executor and compute turn.

    ``run_batch`` may be called any number of times with configs under new
    global indices; every trial of every batch is logged to the same parent,
    counted by the same progress bar and numbered ``run i/total``.
    """

    def __init__(self, ctx: TrainContext, *, tracker: NullTracker, strategy: Exhaustive | SuccessiveHalving,
                 executor: Executor, select_by: str, report: Callable[[str], None] | None,
                 cache: "GridCache | None", states: "RunStateStore | None", samples: Path | None,
                 total: int, planned_epochs: int) -> None:
        self.ctx = ctx
        self.strategy = strategy
        self.executor = executor
        self.select_by = select_by
        self.cache = cache
        self.report = report
        self.progress = SearchProgress(report, progress_bars(ctx.progress), planned_epochs)
        self.log = SearchLog(ctx, tracker, {}, select_by=select_by, progress=self.progress, cache=cache,
                             states=states, samples=samples or ctx.samples, total=total)
        self._turn = contextlib.ExitStack()  # this machine's compute turn, taken at the first trial that trains
        self._turn_taken = False
        self._described = False  # the "grid: N worker processes x T threads" line, said once
        self._work: Callable[..., Any] | None = None

    def say(self, line: str) -> None:
        self.log.say(line)

    def _worker(self, trains: bool) -> Callable[..., Any]:
        """``run_one`` bound to the context workers get (parallel backends: the data as a shared source)."""
        if self._work is None:
            work_ctx = self.ctx
            if self.executor.parallel:
                work_ctx = self.ctx.for_workers(self.executor.data_source(self.ctx.get_data(), self.ctx.prepared_dir))
            self._work = functools.partial(run_one, work_ctx)
        if trains and self.executor.parallel and not self._described:
            self.log.say(f"grid: {self.executor.description}")
            self._described = True
        return self._work

    def run_batch(self, cfgs: Mapping[int, RunConfig],
                  header: Callable[[SearchPlan], str | None] | None = None) -> dict[int, RunRecord]:
        """Train (or reuse) the trials ``cfgs`` (global index -> config) as the strategy says; their records.

        ``header`` makes the batch's first line from its plan (None: no line).
        """
        log, progress, strategy, select_by = self.log, self.progress, self.strategy, self.select_by
        cfgs = dict(cfgs)
        log.add(cfgs)
        records: dict[int, RunRecord] = {}
        plan = plan_search(cfgs, log)
        line = header(plan) if header is not None else None
        if line:
            log.say(line)
        rungs = strategy.rungs(max(cfg.values.epochs for cfg in cfgs.values()))
        hits = {}
        for index, (hit, result) in plan.cached.items():
            records[index] = log.reuse(index, cfgs[index], hit, result)
            hits[index] = hit
            progress.skip(cfgs[index].values.epochs)
            if len(rungs) == 1:  # nothing to rank it against later: its child ends now
                log.end_reused(records[index], hit)
        work = self._worker(trains=len(plan.cached) < len(cfgs))

        def leave(rec: RunRecord) -> None:
            if rec.index in hits:
                log.end_reused(rec, hits[rec.index])
            else:
                log.end(rec)

        alive = sorted(cfgs)
        for number, budget in enumerate(rungs, start=1):
            last = number == len(rungs) or len(alive) == 1
            halving = isinstance(strategy, SuccessiveHalving)
            if halving:
                until = "the end" if last else f"epoch {budget}"
                log.say(f"rung {number}/{len(rungs)}: {len(alive)} trial(s) to {until}")
            todo = [(i, cfgs[i], None if last else budget, log.state_folder(cfgs[i]) is not None) for i in alive
                    if i not in records or records[i].result.status == "paused"]
            if todo and not self._turn_taken:
                self._turn.enter_context(compute_turn("train", report=log.say))
                self._turn_taken = True
            executor = self.executor
            threads = executor.threads_for(len(todo)) if executor.parallel and todo else None
            if threads is not None and threads != getattr(executor, "threads", threads):
                log.say(f"grid.spread_threads: {len(todo)} trial(s) x {threads} torch threads (idle workers' cores)")
            with contextlib.closing(executor.map(work, todo, on_event=log.handle)) as outcomes:
                for outcome in outcomes:
                    failed = outcome.record.result.status == "failed"
                    rec = log.finish(outcome, final=last or failed, rung=number if halving else 0)
                    records[rec.index] = rec
            for i in alive:
                records[i].rung = number if halving else 0
            if last:
                for i in alive:
                    if i not in log.done:
                        leave(records[i])
                break
            kept, pruned = promote([records[i] for i in alive], strategy.keep(len(alive)), budget, select_by)
            for rec in pruned:  # they leave the search here (even one that had already stopped early)
                rec.pruned = True
                if rec.index not in log.done:
                    leave(rec)
            progress.skip(sum(max(0, cfgs[rec.index].values.epochs - budget) for rec in pruned))
            alive = sorted(rec.index for rec in kept)
            log.say(f"rung {number} done: promoted {', '.join(cfgs[i].name for i in alive)}; "
                    f"pruned {len(pruned)} trial(s) at epoch {budget}")
        return records

    def close(self) -> None:
        self.log.close()
        self.executor.stop()  # after the last batch: Ray stays connected between rungs and batches
        self._turn.close()


@contextlib.contextmanager
def open_search(ctx: TrainContext, *, total: int, planned_epochs: int, tracker: NullTracker | None = None,
                strategy: Exhaustive | SuccessiveHalving | None = None, executor: Executor | None = None,
                select_by: str = "val_loss", report: Callable[[str], None] | None = print,
                cache: "GridCache | None" = None, states: "RunStateStore | None" = None,
                samples: Path | None = None) -> Iterator[SearchSession]:
    """A ``SearchSession`` whose failures end every open child run (KILLED, or FAILED for the trial at fault)."""
    session = SearchSession(ctx, tracker=tracker or ctx.tracker, strategy=strategy or Exhaustive(),
                            executor=executor or SequentialExecutor(), select_by=select_by, report=report,
                            cache=cache, states=states, samples=samples, total=total, planned_epochs=planned_epochs)
    log = session.log
    try:
        yield session
    except RunError as err:
        original = err.rebuild()
        log.abort(f"grid stopped: {one_line(str(original), 300)}", failed=err.index, failed_reason=str(original))
        raise original from None
    except KeyboardInterrupt:
        log.abort("interrupted (Ctrl-C)")
        raise
    except BaseException as err:
        log.abort(f"grid stopped: {type(err).__name__}: {one_line(str(err), 300)}")
        raise
    finally:
        session.close()


def run_search(
    configs: Sequence[RunConfig],
    ctx: TrainContext,
    *,
    tracker: NullTracker | None = None,
    strategy: Exhaustive | SuccessiveHalving | None = None,
    executor: Executor | None = None,
    select_by: str = "val_loss",
    report: Callable[[str], None] | None = print,
    cache: "GridCache | None" = None,
    states: "RunStateStore | None" = None,
    samples: Path | None = None,
) -> list[RunRecord]:
    """Train every trial as ``strategy`` says, tracked in MLflow; records in grid order (pruned ones flagged)."""
    strategy = strategy or Exhaustive()
    planned = strategy.planned_epochs([cfg.values.epochs for cfg in configs])
    with open_search(ctx, total=len(configs), planned_epochs=planned, tracker=tracker, strategy=strategy,
                     executor=executor, select_by=select_by, report=report, cache=cache, states=states,
                     samples=samples) as session:
        records = session.run_batch(
            dict(enumerate(configs, start=1)),
            header=lambda plan: f"search: {len(configs)} trial(s), {strategy.name}; {plan_counts(plan, cache)}")
    return [records[index] for index in sorted(records)]
