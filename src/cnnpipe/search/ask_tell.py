"""``grid.strategy: tpe``: a search that learns from finished trials, Optuna's TPE through its ask/tell interface.

Why fixed batches: Optuna's own ``study.optimize(n_jobs=...)`` asks whenever a
worker is free, so which trials it asks depends on which ones finished first,
and a parallel search cannot be reproduced. Here the loop is: ask a batch of
``min(grid.batch, left)`` trials, train them (``runner.SearchSession``: any
backend, any number of workers, any finish order), then tell their results
in trial order. The sampler, ``TPESampler(seed=grid.search_seed,
multivariate=True, constant_liar=True)`` with its first batch random, sees
the same asks and tells whatever the machine, so the same params give the
same trials, each trained as in any other search (the same bits on the same
thread plan), and the same selection.

Why no study storage: a study's history is the sequence of asked trials and
the values told, and every finished trial is already in the run cache, keyed
on its config, the data and the code that trains. A rerun builds a fresh
in-memory study and replays it: an asked config found in the run cache is
told its cached result without training, an unfinished one continues from its
run state. Asks depend only on the seed and the values told so far, so the
replay asks the same trials: a killed search resumes to the identical result,
and a raised ``grid.samples`` continues the same study (its first trials are
cache hits). Another space, seed, ``grid.batch``, data, training code or
optuna version is another study: from its first changed ask on, trials miss
the cache and train.

What the sampler is told: a trial's ``select_by`` value at its best epoch
(``search.selection``), COMPLETE; with ``select_by: [METRIC, COST]`` the
pair (the value, the counted cost: ``models.cost``), so the same TPESampler
models both objectives (Optuna's multi-objective TPE) and the batches learn
the trade-off that ``search.pareto`` then selects on; a trial with no finite
value, FAIL; with
``grid.prune: halving`` (successive halving inside each batch), a pruned
trial's per-epoch values up to the epoch it was pruned at, reported as
intermediate values, then PRUNED. A repeated point (the config of an earlier
trial: likely when most keys are lists) is told that trial's result again,
not trained or logged twice.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.models.cost import network_cost
from cnnpipe.params.run_config import RunConfig
from cnnpipe.params.schema import Params
from cnnpipe.search.backend import Executor
from cnnpipe.search.optuna_space import new_study
from cnnpipe.search.runner import SearchPlan, open_search, plan_counts
from cnnpipe.search.space import TrialSpace
from cnnpipe.search.selection import RunRecord
from cnnpipe.search.strategies import Exhaustive, SuccessiveHalving
from cnnpipe.search.trial import TrainContext
from cnnpipe.tracking.runs import NullTracker

if TYPE_CHECKING:
    from optuna import Study
    from optuna.trial import Trial

    from cnnpipe.params.sections import GridParams
    from cnnpipe.store.run_cache import GridCache
    from cnnpipe.store.states import RunStateStore

DIRECTIONS = {"val_loss": "minimize", "val_top1": "maximize"}


@dataclass(frozen=True)
class Told:
    """What the sampler is told about one trial: its state, value, and (pruned) per-epoch values."""

    state: str  # complete | pruned | fail
    value: float | tuple[float, float] | None = None  # (metric, cost) when select_by names a cost
    steps: tuple[tuple[int, float], ...] = ()


def told_for(rec: RunRecord, select_by: str, pruned_at: int, cost: float | None = None) -> Told:
    """A finished, pruned (at epoch ``pruned_at``) or failed trial, as the sampler hears of it (``cost``: as 2nd value)."""
    if rec.pruned:
        steps = tuple((r.epoch, float(getattr(r, select_by))) for r in rec.result.history
                      if r.epoch <= pruned_at and math.isfinite(getattr(r, select_by)))
        return Told("pruned", steps=steps) if steps else Told("fail")
    value = rec.metric(select_by)
    if not rec.ok or not math.isfinite(value):
        return Told("fail")
    return Told("complete", value if cost is None else (value, float(cost)))


def make_study(grid: "GridParams", select_by: str, cost: str | None = None) -> "Study":
    """A fresh in-memory study: seeded multivariate TPE, constant liar, the first batch random; a cost: 2 objectives."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(seed=grid.search_seed, multivariate=True, constant_liar=True,
                                             n_startup_trials=grid.batch)
    return new_study(sampler, DIRECTIONS[select_by], *(["minimize"] if cost else []))


def tell(study: "Study", trial: "Trial", told: Told) -> None:
    from optuna.trial import TrialState

    if told.state == "complete":
        study.tell(trial, told.value)
        return
    if told.state == "pruned":
        for step, value in told.steps:
            trial.report(value, step)
        study.tell(trial, state=TrialState.PRUNED)
        return
    study.tell(trial, state=TrialState.FAIL)


def run_tpe(
    params: Params,
    ctx: TrainContext,
    *,
    space: TrialSpace | None = None,
    tracker: NullTracker | None = None,
    executor: Executor | None = None,
    report: Callable[[str], None] | None = print,
    cache: "GridCache | None" = None,
    states: "RunStateStore | None" = None,
    samples: Path | None = None,
) -> list[RunRecord]:
    """Ask, train and tell ``grid.samples`` trials in batches of ``grid.batch``; the records in trial order.

    ``space`` (default: from ``params``) turns suggestions into configs; the
    train stage builds it first, so a bad range end stops it before any data
    is loaded. Records carry global trial indices; repeated points have none.
    """
    grid, select_by, cost = params.grid, params.select_metric, params.select_cost
    space = space or TrialSpace(params)
    strategy: Exhaustive | SuccessiveHalving = SuccessiveHalving(grid) if grid.prune == "halving" else Exhaustive()
    total, size = grid.samples, grid.batch
    sizes = [min(size, total - start) for start in range(0, total, size)]

    def planned(epochs: list[int]) -> int:
        return strategy.planned_epochs(epochs) if epochs else 0

    study = make_study(grid, select_by, cost)
    distributions = space.distributions()
    records: dict[int, RunRecord] = {}
    told: dict[str, Told] = {}  # run id -> what the sampler was told (a repeated point is told it again)
    first_of: dict[str, int] = {}  # run id -> the trial that trained it
    with open_search(ctx, total=total, planned_epochs=sum(planned([space.longest] * n) for n in sizes),
                     tracker=tracker, strategy=strategy, executor=executor, select_by=select_by, report=report,
                     cache=cache, states=states, samples=samples) as session:
        pruning = f", successive halving in each (eta {grid.eta})" if grid.prune == "halving" else ""
        session.say(f"search: {total} trial(s), tpe in {len(sizes)} batch(es) of {size}{pruning}; "
                    f"search_seed {grid.search_seed}, {select_by} {DIRECTIONS[select_by]}d"
                    + (f" and {cost} minimized (Pareto front)" if cost else ""))
        for number, count in enumerate(sizes, start=1):
            trials = [study.ask(distributions) for _ in range(count)]
            fresh: dict[int, RunConfig] = {}
            repeats: dict[int, RunConfig] = {}
            for trial in trials:
                index, cfg = trial.number + 1, space.config(trial.params)
                if cfg.run_id in first_of:
                    repeats[index] = cfg
                else:
                    first_of[cfg.run_id] = index
                    fresh[index] = cfg
            session.progress.skip(planned([space.longest] * count) - planned([c.values.epochs for c in fresh.values()]))
            header = _header(number, len(sizes), fresh, repeats, cache)
            done = session.run_batch(fresh, header=header) if fresh else {}
            if not fresh:
                session.say(header(SearchPlan({}, {})))
            rungs = strategy.rungs(max((cfg.values.epochs for cfg in fresh.values()), default=1))
            for rec in done.values():
                price = network_cost(rec.cfg.layers, ctx.data.image_shape, ctx.data.num_classes).get(cost) \
                    if cost and ctx.data is not None else None
                told[rec.cfg.run_id] = told_for(rec, select_by, rungs[max(rec.rung, 1) - 1], price)
            for trial in trials:
                index = trial.number + 1
                cfg = fresh.get(index) or repeats[index]
                tell(study, trial, told[cfg.run_id])
                if index in repeats:
                    session.say(f"trial {index} repeats {cfg.name} (trial {first_of[cfg.run_id]}): "
                                "told its result again, not trained")
            records.update(done)
    return [records[index] for index in sorted(records)]


def _header(number: int, batches: int, fresh: Mapping[int, Any], repeats: Mapping[int, Any],
            cache: "GridCache | None") -> Callable[[SearchPlan], str]:
    """``batch 2/4: trials 5-8; 1 reused from the cache, 0 resumed`` (+ repeats)."""
    indices = sorted([*fresh, *repeats])
    span = f"trial {indices[0]}" if len(indices) == 1 else f"trials {indices[0]}-{indices[-1]}"
    again = f"; {len(repeats)} repeated point(s), told again" if repeats else ""

    def line(plan: SearchPlan) -> str:
        return f"batch {number}/{batches}: {span}; {plan_counts(plan, cache)}{again}"

    return line
