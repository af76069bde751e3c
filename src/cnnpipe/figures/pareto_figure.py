"""The trade-off a two-objective search found (``select_by: [METRIC, COST]``): every trial, the front, the choice.

Drawn from ``reports/grid.csv``, whose rows carry each trial's counted costs
(``params``, ``macs``), whether it is on the Pareto front, and the measured
CPU latency of front trials. The cost axis is logarithmic (architectures
differ by orders of magnitude); the front is a step line, since between two
front points the cheaper one's metric is the best that cost buys. A
``max_cost`` budget is a vertical line, so the selection rule reads off the
picture: the most accurate front point left of it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

from cnnpipe.figures.figure_style import METRIC_LABELS, OTHER_COLOR, SELECTED_COLOR, VAL_COLOR, percent_axis, save_png
from cnnpipe.figures.search_study import minimizes

COST_LABELS = {"params": "parameters", "macs": "multiply-accumulates per image (MACs)"}
FRONT_COLOR = "#1f77b4"


def pareto_front(grid: pd.DataFrame, path: str | os.PathLike[str], *, select_by: str, cost: str,
                 max_cost: float | None = None, selected_run_id: str | None = None) -> Path:
    """Save ``pareto_front_figure`` as a PNG."""
    return save_png(pareto_front_figure(grid, select_by=select_by, cost=cost, max_cost=max_cost,
                                        selected_run_id=selected_run_id), path)


def pareto_front_figure(grid: pd.DataFrame, *, select_by: str, cost: str, max_cost: float | None = None,
                        selected_run_id: str | None = None) -> Figure:
    """Trials as light dots, front trials joined by a step line and labelled (model, latency), the selected one ringed.

    The metric axis holds the front and the bulk of the trials: a trial more
    than 3 interquartile ranges from the median (one diverged to chance
    level) is a mark on the edge, not a stretch of empty axis.
    """
    fig = Figure(figsize=(10, 5.5), layout="constrained")
    ax = fig.subplots()
    rows = grid[np.isfinite(grid[select_by].to_numpy(dtype=float)) & grid[cost].notna()].reset_index(drop=True)
    x = rows[cost].to_numpy(dtype=float)
    y = rows[select_by].to_numpy(dtype=float)
    on_front = rows["pareto_front"].astype(bool).to_numpy()
    low, high = _metric_limits(y, y[on_front])
    outside = (y < low) | (y > high)
    shown = np.clip(y, low, high)
    plain = ~on_front & ~outside
    ax.plot(x[plain], y[plain], "o", color=OTHER_COLOR, alpha=0.7, markersize=7, zorder=2,
            label=f"dominated trial ({int((~on_front).sum())})")
    if outside.any():
        ax.plot(x[outside], shown[outside], "v" if not minimizes(select_by) else "^", color=VAL_COLOR, markersize=8,
                zorder=3, clip_on=False, label=f"off the axis: {select_by} beyond the edge ({int(outside.sum())})")
    order = np.argsort(x[on_front], kind="stable")
    fx, fy = x[on_front][order], y[on_front][order]
    ax.step(fx, fy, where="post", color=FRONT_COLOR, linewidth=1.8, zorder=3)
    ax.plot(fx, fy, "o", color=FRONT_COLOR, markersize=8, zorder=4, label=f"Pareto front ({len(fx)})")
    front_rows = rows[on_front].iloc[order]
    for cx, cy, (_, row) in zip(fx, fy, front_rows.iterrows()):
        ms = float(row["latency_ms"]) if "latency_ms" in row and pd.notna(row["latency_ms"]) else None
        text = " ".join(part for part in (str(row["model"]) if "model" in row else "",
                                          f"{ms:.2f} ms" if ms is not None else "") if part)
        ax.annotate(text, (cx, cy), textcoords="offset points", xytext=(7, -13), fontsize=8, color="0.25")
    selected = (rows["run_id"] == selected_run_id).to_numpy()
    if selected.any():
        i = int(np.flatnonzero(selected)[0])
        ax.plot(x[i], shown[i], "o", markersize=16, markerfacecolor="none", markeredgecolor=SELECTED_COLOR,
                markeredgewidth=2.4, zorder=5, label=f"selected: {rows['run_name'].iloc[i]}")
    if max_cost is not None:
        ax.axvline(max_cost, color=VAL_COLOR, linestyle="--", linewidth=1.4, zorder=1,
                   label=f"max_cost: {max_cost:,.0f} {cost}")
    if len(x) and x.min() > 0:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(f"{COST_LABELS.get(cost, cost)} (counted; lower is cheaper)")
    better = "lower" if minimizes(select_by) else "higher"
    ax.set_ylabel(f"{METRIC_LABELS.get(select_by, select_by)} ({better} is better)")
    if not minimizes(select_by):
        percent_axis(ax)
    ax.set_ylim(low, high)  # the front and the bulk decide (the off-axis marks sit on these edges)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title(f"Pareto front over {len(x)} trials: {METRIC_LABELS.get(select_by, select_by)} against "
                 f"{COST_LABELS.get(cost, cost)}\n(labels: the model, its measured CPU latency per image with 1 "
                 "thread: reported, never selected by)", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    return fig


def _metric_limits(values: np.ndarray, front: np.ndarray) -> tuple[float, float]:
    """The metric axis: every front trial and the bulk of the rest (past 3 IQRs from the median is off the axis)."""
    finite = values[np.isfinite(values)]
    if not len(finite):
        return 0.0, 1.0
    q1, median, q3 = np.percentile(finite, [25, 50, 75])
    spread = max(q3 - q1, 0.02 * max(abs(median), 1e-12))
    bulk = finite[np.abs(finite - median) <= 3 * spread]
    kept = np.concatenate([bulk, front[np.isfinite(front)]])
    lo, hi = float(kept.min()), float(kept.max())
    pad = max((hi - lo) * 0.08, 1e-3)
    return lo - pad, hi + pad
