"""Training curves over epochs: one run's learning curves, and every grid run's overlaid.

Both draw the same three panels (``CURVE_PANELS``: loss, top-1, validation
top-5) from ``history.csv`` rows, train against validation, with the epoch
whose weights were kept marked, so the selected run's figure reads like one
line of the all-runs figure.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from cnnpipe.figures.figure_style import (
    TRAIN_COLOR,
    TRAIN_LABEL,
    VAL_COLOR,
    VAL_LABEL,
    epoch_axis,
    mark_best,
    percent_axis,
    point_marker,
    run_colors,
    save_png,
)
from cnnpipe.figures.grid_table import pruned_at

if TYPE_CHECKING:
    from matplotlib.axes import Axes

CURVES_NOTE = ("train curves: running mean over each epoch's batches as trained (augmentation, dropout/batch-norm "
               "in train mode, label smoothing in the loss); validation: after each epoch, eval mode, no augmentation")
# (panel title, (column, legend label, colour) per line, y label, accuracy axis); the last line is the one
# whose value at the best epoch is starred
CURVE_PANELS: tuple[tuple[str, tuple[tuple[str, str, str], ...], str, bool], ...] = (
    ("Loss", (("train_loss", TRAIN_LABEL, TRAIN_COLOR), ("val_loss", VAL_LABEL, VAL_COLOR)), "cross-entropy loss", False),
    ("Top-1 accuracy", (("train_top1", TRAIN_LABEL, TRAIN_COLOR), ("val_top1", VAL_LABEL, VAL_COLOR)), "top-1 accuracy", True),
    ("Validation top-5 accuracy", (("val_top5", VAL_LABEL, VAL_COLOR),), "top-5 accuracy", True),
)


def learning_curves(
    history: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    best_epoch: int | None = None,
    title: str = "Learning curves",
    stop_reason: str | None = None,
) -> Path:
    """Train vs validation loss and top-1, validation top-5, for one run; best epoch marked.

    ``history`` has one row per epoch (``history.csv`` / ``curves.csv`` columns).
    """
    history = history.sort_values("epoch")
    fig = Figure(figsize=(15, 4.8), layout="constrained")
    axes = fig.subplots(1, 3)
    marker = point_marker(len(history))
    for ax, (panel_title, series, ylabel, percent) in zip(axes, CURVE_PANELS):
        for column, label, color in series:
            if column in history:
                ax.plot(history["epoch"], history[column], color=color, marker=marker, markersize=4, label=label)
        if best_epoch is not None:
            mark_best(ax, best_epoch, label=True)
            row = history[history["epoch"] == best_epoch]
            val_column = series[-1][0]
            if not row.empty and val_column in row:
                ax.plot(best_epoch, float(row[val_column].iloc[0]), marker="*", markersize=14, color=VAL_COLOR,
                        markeredgecolor="black", linestyle="none", zorder=5)
        ax.set_title(panel_title)
        ax.set_ylabel(ylabel)
        epoch_axis(ax, int(history["epoch"].max()) if len(history) else 1)
        if percent:
            percent_axis(ax)
        ax.legend(loc="best", fontsize=9)
    subtitle = _stop_text(best_epoch, len(history), stop_reason)
    fig.suptitle(f"{title}\n{subtitle}" if subtitle else title, fontsize=13)
    fig.supxlabel(CURVES_NOTE, fontsize=9, color="#444444")
    return save_png(fig, path)


def _stop_text(best_epoch: int | None, epochs_run: int, stop_reason: str | None) -> str:
    """The subtitle: whose weights were kept and why training stopped (nothing for a plain max_epochs run)."""
    parts = []
    if best_epoch is not None:
        parts.append(f"best epoch {best_epoch} of {epochs_run} (star: weights kept)")
    if stop_reason == "early_stopping":
        parts.append(f"early stopping after epoch {epochs_run}")
    elif stop_reason and stop_reason != "max_epochs":
        parts.append(stop_reason.split(":")[0])
    return "; ".join(parts)


def grid_curves(
    history: pd.DataFrame,
    path: str | os.PathLike[str],
    *,
    grid: pd.DataFrame | None = None,
    selected_run_id: str | None = None,
) -> Path:
    """Every grid run's curves overlaid: one colour per run, train dashed, validation solid.

    ``history`` holds every run (``history.csv``); ``grid`` (``grid.csv``), when given,
    fixes the run order and marks each run's best epoch with a dot.
    """
    run_ids = list(dict.fromkeys(grid["run_id"] if grid is not None else history["run_id"]))
    run_ids = [r for r in run_ids if r in set(history["run_id"])] or list(dict.fromkeys(history["run_id"]))
    names = dict(zip(history["run_id"], history["run_name"]))
    best = {}
    if grid is not None and "best_epoch" in grid:
        best = {r: int(e) for r, e in zip(grid["run_id"], grid["best_epoch"]) if pd.notna(e)}
    status = dict(zip(grid["run_id"], grid["status"].astype(str))) if grid is not None and "status" in grid else {}
    pruned = pruned_at(grid) if grid is not None else {}
    colors = dict(zip(run_ids, run_colors(len(run_ids))))
    legend_rows = math.ceil(len(run_ids) / 3) + 1
    fig = Figure(figsize=(15, 4.8 + 0.25 * legend_rows), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (panel_title, series, ylabel, percent) in zip(axes, CURVE_PANELS):
        for run_id in run_ids:
            run = history[history["run_id"] == run_id].sort_values("epoch")
            selected = run_id == selected_run_id
            width = 2.6 if selected else 1.4
            marker = point_marker(len(run))
            for column, label, _ in series:
                if column not in run:
                    continue
                style = "--" if column.startswith("train") else "-"
                ax.plot(run["epoch"], run[column], color=colors[run_id], linestyle=style, linewidth=width,
                        marker=marker, markersize=3, alpha=0.95 if selected else 0.8)
            val_column = series[-1][0]
            epoch = best.get(run_id)
            row = run[run["epoch"] == epoch] if epoch is not None else run.iloc[0:0]
            if not row.empty and val_column in row:
                ax.plot(epoch, float(row[val_column].iloc[0]), marker="o", markersize=7, color=colors[run_id],
                        markeredgecolor="black", linestyle="none", zorder=5)
        sane = [r for r in run_ids if status.get(r, "finished") == "finished" or r in pruned]
        clipped = not percent and _clip_diverged(ax, history, sane, [c for c, _, _ in series])
        ax.set_title(f"{panel_title} (diverged runs clipped)" if clipped else panel_title)
        ax.set_ylabel(ylabel)
        epoch_axis(ax, int(history["epoch"].max()) if len(history) else 1)
        if percent:
            percent_axis(ax)

    def label(run_id: str) -> str:
        extra = "  (selected)" if run_id == selected_run_id else ""
        if run_id in pruned:
            extra += f"  (pruned at epoch {pruned[run_id]})"
        elif status.get(run_id, "finished") != "finished":
            extra += f"  ({status[run_id]})"
        return f"{names.get(run_id, run_id)}{extra}"

    handles = [Line2D([], [], color=colors[r], linewidth=2.6 if r == selected_run_id else 1.6, label=label(r))
               for r in run_ids]
    styles = [
        Line2D([], [], color="black", linestyle="--", label=TRAIN_LABEL),
        Line2D([], [], color="black", linestyle="-", label=VAL_LABEL),
        Line2D([], [], color="grey", marker="o", markeredgecolor="black", linestyle="none", label="best epoch"),
    ]
    axes[0].legend(handles=styles, loc="upper right", fontsize=9)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(3, len(handles)), fontsize=9,
               frameon=False, title="runs (colour)", title_fontsize=9)
    fig.suptitle(f"All grid runs ({len(run_ids)})\ntrain (dashed): running mean as trained, augmented, train mode; "
                 "validation (solid): clean, eval mode", fontsize=12)
    return save_png(fig, path)


def _clip_diverged(ax: "Axes", history: pd.DataFrame, finished: list[str], columns: list[str]) -> bool:
    """Keep a diverging run's exploding loss from flattening every other curve; True if clipped.
    ``finished`` runs set the range, less any whose best loss is over ten times the median run's."""
    columns = [c for c in columns if c in history]
    best = history[history["run_id"].isin(finished)].groupby("run_id")[columns].min().min(axis=1)
    ok = history[history["run_id"].isin(best.index[best <= 10 * best.median()])][columns].to_numpy(dtype=float)
    every = history[columns].to_numpy(dtype=float)
    ok, every = ok[np.isfinite(ok)], every[np.isfinite(every)]
    if ok.size and every.size and every.max() > 1.5 * ok.max():
        span = max(float(ok.max() - ok.min()), 1e-6)
        ax.set_ylim(float(ok.min()) - 0.05 * span, float(ok.max()) + 0.15 * span)
        return True
    return False
