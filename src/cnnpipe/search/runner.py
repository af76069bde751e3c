"""The search loop of the train stage: reuse, resume, rungs, and the executor.

``run_search`` first takes every finished trial from the run cache, then
trains the rest rung by rung (the exhaustive grid is one rung to the end) on
a backend (``search.backend_choice``: sequential, local processes, Ray). Each
trial continues from its saved run state, so a killed search resumes where
it stopped and a promoted trial never retrains an epoch. A failed trial is
recorded and the search goes on; a ``CnnpipeError`` in a trial stops it
(that child FAILED, the others KILLED) and propagates, and so does Ctrl-C.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
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
    """What the stage's first line reports: trials reused from the cache and resumed from state."""

    cached: dict[int, tuple["CachedRun", Any]]
    resumed: dict[int, int]  # index -> saved epoch


def plan_search(configs: Sequence[RunConfig], log: SearchLog) -> SearchPlan:
    cached, resumed = {}, {}
    for index, cfg in enumerate(configs, start=1):
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
    executor = executor or SequentialExecutor()
    strategy = strategy or Exhaustive()
    tracker = tracker or ctx.tracker
    cfgs = dict(enumerate(configs, start=1))
    progress = SearchProgress(report, progress_bars(ctx.progress),
                              strategy.planned_epochs([cfg.values.epochs for cfg in configs]))
    log = SearchLog(ctx, tracker, cfgs, select_by=select_by, progress=progress, cache=cache, states=states,
                    samples=samples or ctx.samples)
    records: dict[int, RunRecord] = {}
    turn, turned = contextlib.ExitStack(), False  # this machine's compute turn, taken at the first trial that trains
    try:
        plan = plan_search(configs, log)
        if report is not None:
            parts = [f"{len(plan.cached)} reused from the cache" if cache is not None and cache.reuse else
                     "cache not reused" if cache is not None else "cache off",
                     f"{len(plan.resumed)} resumed"]
            log.say(f"search: {len(configs)} trial(s), {strategy.name}; " + ", ".join(parts))
        rungs = strategy.rungs(max(cfg.values.epochs for cfg in configs))
        hits = {}
        for index, (hit, result) in plan.cached.items():
            records[index] = log.reuse(index, cfgs[index], hit, result)
            hits[index] = hit
            progress.skip(cfgs[index].values.epochs)
            if len(rungs) == 1:  # nothing to rank it against later: its child ends now
                log.end_reused(records[index], hit)
        work_ctx = ctx
        if executor.parallel:
            work_ctx = ctx.for_workers(executor.data_source(ctx.get_data(), ctx.prepared_dir))
            if len(plan.cached) < len(cfgs):  # something will train on it
                log.say(f"grid: {executor.description}")
        work = functools.partial(run_one, work_ctx)

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
            if todo and not turned:
                turn.enter_context(compute_turn("train", report=log.say))
                turned = True
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
        log.close()
        executor.stop()  # after the last rung: Ray stays connected between rungs
        turn.close()
    return [records[index] for index in sorted(records)]
