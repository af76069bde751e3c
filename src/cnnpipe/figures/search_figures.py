"""How the search's trials compare: every run ranked as selection ranks them, and successive halving's rungs.

Both read ``grid.csv`` (and, for the rungs, ``history.csv``), mark the
selected run, and set the trials successive halving pruned apart: a pruned
trial was measured at an earlier epoch, so it is never ranked with the
finalists. A diverging trial's huge loss is clipped, never allowed to
flatten every other bar or curve.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, PercentFormatter

from cnnpipe.figures.figure_style import (
    METRIC_LABELS,
    OTHER_COLOR,
    PRUNED_COLOR,
    SELECTED_COLOR,
    epoch_axis,
    percent_axis,
    point_marker,
    run_colors,
    save_png,
)
from cnnpipe.figures.grid_table import pruned_at, rank_runs


def grid_comparison(grid: pd.DataFrame, path: str | os.PathLike[str], *, select_by: str = "val_loss",
                    selected_run_id: str | None = None) -> Path:
    """Every grid run's ``select_by`` (at its best epoch) as labelled bars, ranked as the train stage selects.

    The selected (green) run is on top; failed or diverged runs are listed last with their status.
    Trials pruned by successive halving were measured at an earlier epoch: they are not ranked
    with the finalists but set apart below (grey, "pruned at epoch N"), later rungs first.
    """
    return save_png(grid_comparison_figure(grid, select_by=select_by, selected_run_id=selected_run_id), path)


def grid_comparison_figure(grid: pd.DataFrame, *, select_by: str = "val_loss",
                           selected_run_id: str | None = None) -> Figure:
    """The comparison bars as a ``Figure`` (``grid_comparison`` writes it; tests read its axes)."""
    stopped = pruned_at(grid)  # run id -> the epoch it was pruned at
    loss = select_by == "val_loss"
    ranked = rank_runs(grid, select_by)
    finalists = ranked[~ranked["run_id"].isin(list(stopped))]
    pruned = grid[grid["run_id"].isin(list(stopped))]  # by rung (latest first), then metric: one epoch per rung
    metric = pd.to_numeric(pruned[select_by], errors="coerce").to_numpy(dtype=float) * (1 if loss else -1)
    pruned = pruned.iloc[np.lexsort((np.arange(len(pruned)), np.nan_to_num(metric, nan=np.inf),
                                     [-stopped[r] for r in pruned["run_id"]]))]
    table = pd.concat([finalists, pruned])
    other = "val_top1" if loss else "val_loss"
    n = len(table)
    fig = Figure(figsize=(12 if stopped else 10, 1.6 + 0.42 * n), layout="constrained")
    ax = fig.subplots()
    y = np.arange(n)
    raw = pd.to_numeric(table[select_by], errors="coerce")
    second = pd.to_numeric(table[other], errors="coerce") if other in table else pd.Series(np.nan, index=table.index)
    values = raw.fillna(0.0).to_numpy()
    colors = [SELECTED_COLOR if r == selected_run_id else PRUNED_COLOR if r in stopped else OTHER_COLOR
              for r in table["run_id"]]
    ax.barh(y, values, color=colors, edgecolor="#333333", linewidth=0.5)
    statuses = table["status"] if "status" in table else pd.Series(["finished"] * n, index=table.index)
    sane = values[values <= 10 * np.median(values[values > 0])] if (values > 0).any() else values
    top = float(sane.max()) if n and sane.max() > 0 else 1.0  # a diverging trial's bar runs off the edge
    span = 1.0 if not loss else top
    room = 1.3 if stopped else 1.0  # the longer "pruned at epoch N" labels
    for yi, value, main, extra, status, run_id in zip(y, values, raw, second, statuses, table["run_id"]):
        if pd.notna(main):
            text = f"{main:.4f} (top-1 {extra:.2%})" if loss and pd.notna(extra) else (
                f"{main:.2%} (loss {extra:.4f})" if pd.notna(extra) else (f"{main:.4f}" if loss else f"{main:.2%}"))
            if run_id in stopped:
                text += f" (pruned at epoch {stopped[run_id]})"
            elif status not in ("finished", None) and str(status) != "nan":
                text += f" ({status})"
        else:
            text = str(status)
        off_edge = value > top * 1.2 - 1e-12 and loss  # a diverging trial's bar: its label sits on it
        ax.text(top * 1.35 * room if off_edge else value + 0.005 * span, yi, text, va="center", fontsize=9,
                ha="right" if off_edge else "left", **({"backgroundcolor": "white"} if off_edge else {}))
    labels = [f"{name}  (selected)" if r == selected_run_id else str(name)
              for name, r in zip(table["run_name"], table["run_id"])]
    ax.set_yticks(y, labels)
    ax.invert_yaxis()  # best on top
    if loss:
        ax.set_xlim(0, top * 1.35 * room)  # from zero: bar lengths stay honest; labels give the exact values
    else:
        ax.set_xlim(0, 1.12 * room)
        ax.set_xticks(np.linspace(0, 1, 6))
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    name = METRIC_LABELS.get(select_by, select_by)
    ax.set_xlabel(f"{name} at each run's best epoch ({'lower' if loss else 'higher'} is better)")
    if stopped:
        ax.axhline(len(finalists) - 0.5, color="0.3", linewidth=1.2)
    ax.set_title(f"{len(finalists)} finalists ranked by select_by: {select_by} (green: selected)\ngrey: {len(pruned)} "
                 "trials pruned earlier, not ranked with them (latest rung first)" if stopped else
                 f"{n} grid runs ranked by select_by: {select_by} (green: selected)")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def halving_rungs(history: pd.DataFrame, grid: pd.DataFrame, path: str | os.PathLike[str], *,
                  selected_run_id: str | None = None, select_by: str = "val_loss") -> Path:
    """The rungs of a successive-halving search: ``select_by`` per trial per epoch, pruned trials grey."""
    return save_png(halving_rungs_figure(history, grid, selected_run_id=selected_run_id, select_by=select_by), path)


def halving_rungs_figure(history: pd.DataFrame, grid: pd.DataFrame, *, selected_run_id: str | None = None,
                         select_by: str = "val_loss") -> Figure:
    """Pruned curves end at ``x``, rungs at dashed lines; finalists coloured, the selected one thickest.
    A loss axis is logarithmic, capped at 10x the median trial's best loss: one diverged trial (val_loss
    25) would flatten every other curve; its points above the cap are ``^`` on the top edge."""
    pruned = pruned_at(grid)
    names = dict(zip(grid["run_id"], grid["run_name"]))
    survivors = [r for r in grid["run_id"] if r not in pruned]
    colors = dict(zip(survivors, run_colors(len(survivors))))
    fig = Figure(figsize=(9, 5.2), layout="constrained")
    ax = fig.subplots()
    stops = sorted(set(pruned.values()))
    for epoch in stops:
        ax.axvline(epoch, color="0.6", linestyle="--", linewidth=1)
    loss = select_by != "val_top1"
    values = pd.to_numeric(history[select_by], errors="coerce") if select_by in history else pd.Series(dtype=float)
    finite = values[np.isfinite(values) & (values > 0)]
    best = finite.groupby(history.loc[finite.index, "run_id"]).min()
    limit = float(best.median() * 10) if loss and len(best) else math.inf
    clipped = set()
    for run_id in grid["run_id"]:
        run = history[history["run_id"] == run_id].sort_values("epoch")
        if run.empty or select_by not in run:
            continue
        ys = pd.to_numeric(run[select_by], errors="coerce").to_numpy(dtype=float)
        over, shown = ys > limit, np.minimum(ys, limit)
        color, selected = "0.45" if run_id in pruned else colors[run_id], run_id == selected_run_id
        if run_id in pruned:
            ax.plot(run["epoch"], shown, color="0.7", linewidth=1, marker=point_marker(len(run)), markersize=3)
            ax.plot(run["epoch"].iloc[-1], shown[-1], marker="x", color=color, linestyle="none")
        else:
            ax.plot(run["epoch"], shown, color=color, linewidth=3 if selected else 1.8, marker=point_marker(len(run)),
                    markersize=4, label=f"{names[run_id]}{' (selected)' if selected else ''}")
        if over.any():
            clipped.add(run_id)
            ax.plot(run["epoch"][over], shown[over], marker="^", color=color, linestyle="none")
    ax.plot([], [], color="0.7", marker="x", label=f"pruned ({len(pruned)} trials)")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{select_by} (log scale)" if loss else select_by)
    if loss and len(finite):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""))
        ax.set_ylim(float(finite.min()) / 1.15, min(float(finite.max()), limit) * 1.15)
    if select_by == "val_top1":
        percent_axis(ax)
    epoch_axis(ax, int(history["epoch"].max()) if len(history) else 1)
    note = f"\n{len(clipped)} diverging trial(s) clipped at {limit:.3g} (^ on the top edge)" if clipped else ""
    ax.set_title(f"Successive halving: {len(grid)} trials, rungs end at epochs {', '.join(map(str, stops)) or '-'}{note}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig
