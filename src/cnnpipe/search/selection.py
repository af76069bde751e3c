"""Run records and how a run is chosen: by validation metric only, never the test set.

``rung_score`` ranks a trial from its history alone (replaying early stopping
up to the rung's epoch), so a trial trained now, resumed, or read from the
run cache ranks the same: the same params always select the same run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cnnpipe.util.errors import CnnpipeError
from cnnpipe.params.run_config import RunConfig
from cnnpipe.params.values import METRICS
from cnnpipe.util.text import one_line

if TYPE_CHECKING:
    from cnnpipe.engine.records import RunResult
    from cnnpipe.engine.records import EpochRecord
    from cnnpipe.models.cost import NetworkCost

SELECT_BY = METRICS


class GridFailed(CnnpipeError):
    """Every run of the grid failed, so there is no model to select."""


@dataclass
class RunRecord:
    """One trial's outcome: its config, the engine's result and its MLflow child run."""

    index: int  # 1-based position in the grid
    cfg: RunConfig
    result: "RunResult"
    mlflow_run_id: str | None = None
    cached: bool = False  # reused from the run cache instead of trained
    reused_from: str | None = None  # the MLflow child run that trained it (when cached)
    resumed_at: int | None = None  # continued from its saved run state after this epoch
    rung: int = 0  # the last successive-halving rung it reached (0: exhaustive grid)
    pruned: bool = False  # stopped by successive halving at ``result.epochs_run``
    # select_by [METRIC, COST] (``search.pareto``): the counted costs, the measured latency of a front trial
    cost: "NetworkCost | None" = None
    latency_ms: float | None = None
    on_front: bool = False  # on the Pareto front of the metric and the cost

    @property
    def ok(self) -> bool:
        """Has a usable best epoch: finished, or diverged after at least one finite validation epoch."""
        r = self.result
        return (r.status in ("finished", "diverged", "paused") and r.best is not None and r.model is not None
                and math.isfinite(r.best.val_loss))

    @property
    def status(self) -> str:
        """For tables: reused / pruned / finished / diverged / failed."""
        if self.pruned:
            return "pruned"
        return "reused" if self.cached else self.result.status

    def metric(self, name: str) -> float:
        return float(getattr(self.result.best, name)) if self.result.best is not None else math.nan


def failure_reason(result: "RunResult") -> str:
    """``diverged: loss is nan at epoch 3 batch 17`` / ``failed: RuntimeError: ...`` (status named once)."""
    reason = result.stop_reason or "unknown"
    return reason if reason.startswith(result.status) else f"{result.status}: {reason}"


def selection_key(select_by: str, loss: float, top1: float, index: int) -> tuple[float, float, int]:
    loss = loss if math.isfinite(loss) else math.inf
    top1 = top1 if math.isfinite(top1) else -math.inf
    if select_by == "val_loss":
        return (loss, -top1, index)
    return (-top1, loss, index)


def candidates_for(records: Sequence[RunRecord], select_by: str) -> list[RunRecord]:
    """The runs a selection may pick: usable, with a finite ``select_by``; ``GridFailed`` when there are none."""
    if select_by not in SELECT_BY:
        raise ValueError(f"select_by must be val_loss or val_top1, got {select_by!r}")
    candidates = [rec for rec in records if rec.ok and math.isfinite(rec.metric(select_by))]
    if not candidates:
        first = next((rec for rec in records if not rec.ok), None)
        detail = f" (first: {first.cfg.name}: {one_line(failure_reason(first.result), 160)})" if first else ""
        raise GridFailed(
            f"all {len(records)} grid runs failed{detail}; lower lr, check the data, or see the runs in MLflow"
        )
    return candidates


def select_best(records: Sequence[RunRecord], select_by: str) -> RunRecord:
    """The usable run with the best ``select_by`` (val_loss lowest, val_top1 highest).

    Ties go to the other validation metric, then to the earlier grid point, so
    the choice is deterministic. Raises ``GridFailed`` when no run is usable.
    """
    return min(candidates_for(records, select_by), key=lambda rec: ranking(rec, select_by))


def ranking(rec: RunRecord, select_by: str) -> tuple[float, float, int]:
    """A finished trial's sort key by ``select_by`` at its best epoch: lower is better."""
    return selection_key(select_by, rec.metric("val_loss"), rec.metric("val_top1"), rec.index)


def best_epoch_until(history: Sequence["EpochRecord"], epoch: int, monitor: str, min_delta: float) -> "EpochRecord | None":
    """The epoch early stopping would have kept after ``epoch`` epochs (same rule as ``EarlyStopping``)."""
    best = None
    best_value = math.inf if monitor == "val_loss" else -math.inf
    for record in history:
        if record.epoch > epoch:
            break
        value = getattr(record, monitor)
        if math.isnan(value):
            continue
        better = value < best_value - min_delta if monitor == "val_loss" else value > best_value + min_delta
        if better:
            best, best_value = record, value
    return best


def rung_score(rec: RunRecord, epoch: int, select_by: str) -> tuple[float, float, int]:
    """Sort key of a trial at a rung ending at ``epoch``: lower is better; failed trials rank last."""
    v = rec.cfg.values
    best = best_epoch_until(rec.result.history, epoch, v.monitor, v.min_delta) if rec.result.status != "failed" else None
    if best is None:
        return (math.inf, math.inf, rec.index)
    return selection_key(select_by, best.val_loss, best.val_top1, rec.index)
