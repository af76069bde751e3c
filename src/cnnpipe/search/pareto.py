"""Selection by a metric and a cost (``select_by: [METRIC, COST]``): the Pareto front and the rule that picks one.

For the engineer who ships to a phone or a small CPU: a model a little less
accurate and many times cheaper may be the right one. A trial is on the
Pareto front when no other usable trial is at least as good on the metric
*and* at least as cheap, and strictly better on one. The rule stated in
``params.yaml`` then picks one front trial: the most accurate whose cost is
at most ``max_cost`` (``null``: the most accurate of all). Ties go as in
``select_best``: the other validation metric, then the earlier trial.

Costs are counted (``models.cost``: parameters, multiply-accumulates), so
the same params always select the same trial. The CPU latency of each front
trial is measured after the selection, for the report only.
"""

from __future__ import annotations

from collections.abc import Sequence

from cnnpipe.models.cost import latency_ms, network_cost
from cnnpipe.search.selection import RunRecord, candidates_for, ranking, select_best
from cnnpipe.util.errors import CnnpipeError


class OverBudget(CnnpipeError):
    """No trial on the Pareto front costs at most ``max_cost``."""


def attach_costs(records: Sequence[RunRecord], in_shape: Sequence[int], num_classes: int) -> None:
    """Count every trial's parameters and multiply-accumulates (``rec.cost``); one count per architecture."""
    for rec in records:
        rec.cost = network_cost(rec.cfg.layers, in_shape, num_classes)


def pareto_front(records: Sequence[RunRecord], metric: str, cost: str) -> list[RunRecord]:
    """The usable trials that no other usable trial dominates on ``metric`` and ``cost``, cheapest first.

    Equal trials (the same value and cost) do not dominate each other: both
    are on the front. Quadratic, which is nothing at ``grid.max_runs`` trials.
    """
    usable = candidates_for(records, metric)
    points = [(_value(rec, metric), _cost(rec, cost)) for rec in usable]
    front = [rec for rec, (value, price) in zip(usable, points)
             if not any(v <= value and p <= price and (v, p) != (value, price) for v, p in points)]
    return sorted(front, key=lambda rec: (_cost(rec, cost), ranking(rec, metric)))


def _value(rec: RunRecord, metric: str) -> float:
    """The metric oriented so that lower is better (its value alone: the tie-breaks are not an objective)."""
    return ranking(rec, metric)[0]


def _cost(rec: RunRecord, cost: str) -> int:
    if rec.cost is None:
        raise ValueError(f"trial {rec.index} has no counted cost: call attach_costs first")
    return rec.cost.get(cost)


def select_on_front(records: Sequence[RunRecord], metric: str, cost: str, max_cost: float | None) -> RunRecord:
    """The most accurate front trial within ``max_cost`` (all of them when None); marks ``on_front``."""
    front = pareto_front(records, metric, cost)
    for rec in records:
        rec.on_front = any(rec is member for member in front)
    affordable = [rec for rec in front if max_cost is None or _cost(rec, cost) <= max_cost]
    if not affordable:
        cheapest = front[0]
        raise OverBudget(
            f"no trial costs at most max_cost={max_cost:g} {cost}: the cheapest on the Pareto front, "
            f"{cheapest.cfg.name}, costs {_cost(cheapest, cost):,} ({metric} {cheapest.metric(metric):.4g}); "
            f"raise max_cost or search smaller models (the trials are cached: a rerun does not train them again)"
        )
    return min(affordable, key=lambda rec: ranking(rec, metric))


def choose(records: Sequence[RunRecord], metric: str, cost: str | None, max_cost: float | None, *,
           in_shape: Sequence[int], num_classes: int) -> RunRecord:
    """The selected trial: by ``metric`` alone, or on the front of ``metric`` and ``cost`` (front latency measured)."""
    if cost is None:
        return select_best(records, metric)
    attach_costs(records, in_shape, num_classes)
    best = select_on_front(records, metric, cost, max_cost)
    for rec in records:
        if rec.on_front:
            rec.latency_ms = latency_ms(rec.cfg.layers, in_shape, num_classes)
    return best
