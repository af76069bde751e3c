"""What a search learned, drawn for every strategy: its objective trial by trial, what mattered, and how.

* ``search_history``: each trial's objective (``search_study.trial_table``)
  in trial order, the best so far as a step line, the selected run ringed;
  pruned trials apart (measured at an earlier epoch), failed ones on the edge.
* ``param_importance``: each varying axis's share of the objective's
  variation (``search_study.param_importances``), most important on top.
* ``param_slices``: the objective against the two most important axes,
  coloured by trial order (does tpe close in on a region? is the best at an
  edge of the range?).

The stage computes the importances once and hands them to both figures that
use them, so a figure's cache key (``figure_cache.draw``) holds the numbers
it draws. A loss axis is logarithmic and capped at 10x the median, as in
``search_figures``: one diverged trial must not flatten the others.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from cnnpipe.figures.figure_style import METRIC_LABELS, SELECTED_COLOR, VAL_COLOR, percent_axis, save_png
from cnnpipe.figures.search_study import Importances, choices, is_categorical_axis, minimizes, plain

if TYPE_CHECKING:
    from matplotlib.axes import Axes

TRIAL_COLOR = "#1f77b4"


def _objective_limit(values: np.ndarray, select_by: str) -> float:
    """A loss axis stops at 10x the median finished loss: one diverged trial must not flatten the others."""
    finite = values[np.isfinite(values)]
    return float(np.median(finite) * 10) if minimizes(select_by) and len(finite) else math.inf


def _objective_axis(ax: "Axes", values: np.ndarray, limit: float, select_by: str) -> None:
    """A loss on a log axis (when every value is positive) fitted to the values, an accuracy in %."""
    finite = values[np.isfinite(values)]
    ax.set_ylabel(f"{METRIC_LABELS.get(select_by, select_by)} ({'lower' if minimizes(select_by) else 'higher'} is "
                  "better)")
    if not minimizes(select_by):
        percent_axis(ax)
        return
    if len(finite) and finite.min() > 0:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else ""))
        ax.set_ylim(float(finite.min()) / 1.15, min(float(finite.max()), limit) * 1.15)


def search_history(trials: pd.DataFrame, path: str | os.PathLike[str], *, select_by: str = "val_loss",
                   selected_run_id: str | None = None) -> Path:
    """Each trial's objective in trial order and the best so far (``trial_table``'s rows)."""
    return save_png(search_history_figure(trials, select_by=select_by, selected_run_id=selected_run_id), path)


def search_history_figure(trials: pd.DataFrame, *, select_by: str = "val_loss",
                          selected_run_id: str | None = None) -> Figure:
    """Finished trials as dots, the best so far as a green step line, the selected run ringed; pruned trials
    grey ``x`` (measured at an earlier epoch), trials without a value red ``x`` on the worse edge."""
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax = fig.subplots()
    x = trials["trial"].to_numpy(dtype=int)
    y = trials["objective"].to_numpy(dtype=float)
    done = trials["candidate"].to_numpy(dtype=bool)
    pruned = (trials["status"] == "pruned").to_numpy() & np.isfinite(y)
    failed = ~done & ~pruned
    limit = _objective_limit(y[done], select_by)
    shown = np.minimum(y, limit)
    over = done & (y > limit)
    ax.plot(x[done & ~over], shown[done & ~over], "o", color=TRIAL_COLOR, markersize=6 if len(x) <= 60 else 4,
            zorder=3, label=f"finished trial ({int(done.sum())})")
    if over.any():
        ax.plot(x[over], shown[over], "^", color=VAL_COLOR, markersize=8, zorder=4,
                label=f"above {limit:.3g} (clipped: {int(over.sum())})")
    if pruned.any():
        ax.plot(x[pruned], shown[pruned], "x", color="0.55", markersize=6, zorder=2,
                label=f"pruned: at an earlier epoch, not a candidate ({int(pruned.sum())})")
    ax.step(x, trials["best_so_far"].to_numpy(dtype=float), where="post", color=SELECTED_COLOR, linewidth=2.2,
            zorder=2, label="best so far")
    selected = (trials["run_id"] == selected_run_id).to_numpy() & done
    if selected.any():
        i = int(np.flatnonzero(selected)[0])
        ax.plot(x[i], shown[i], "o", markersize=15, markerfacecolor="none", markeredgecolor=SELECTED_COLOR,
                markeredgewidth=2.2, zorder=5, label=f"selected: trial {x[i]}, {trials['run_name'].iloc[i]}")
    _objective_axis(ax, shown[done | pruned], limit, select_by)
    if failed.any():  # no value to place: a mark on the worse edge of the axis
        edge = 0.97 if minimizes(select_by) else 0.03
        ax.plot(x[failed], np.full(int(failed.sum()), edge), "x", color=VAL_COLOR, markersize=8, zorder=4,
                transform=ax.get_xaxis_transform(), clip_on=False, label=f"failed: no value ({int(failed.sum())})")
    ax.set_xlim(0.5, max(len(x), 1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("trial (the order trained; tpe: the order asked)")
    ax.grid(True, alpha=0.3)
    direction = "minimized" if minimizes(select_by) else "maximized"
    best = trials["best_so_far"].dropna()
    found = ""
    if len(best):
        first = int(np.flatnonzero(trials["best_so_far"].to_numpy(dtype=float) == best.iloc[-1])[0])
        value = f"{best.iloc[-1]:.4g}" if minimizes(select_by) else f"{best.iloc[-1]:.2%}"
        found = f"; best {value}, first reached at trial {first + 1} of {len(x)}"
    ax.set_title(f"Search history: {select_by} at each trial's best epoch ({direction}){found}")
    ax.legend(fontsize=8, loc="best")
    return fig


def param_importance(importances: Importances, path: str | os.PathLike[str], *, select_by: str = "val_loss") -> Path:
    """Each varying axis's importance as a bar, most important on top."""
    return save_png(param_importance_figure(importances, select_by=select_by), path)


def param_importance_figure(importances: Importances, *, select_by: str = "val_loss") -> Figure:
    """Horizontal bars labelled with their share; log-scaled axes say so in their label."""
    names, values = importances.names, np.array([v for _, v in importances.values], dtype=float)
    fig = Figure(figsize=(9, 1.8 + 0.45 * len(names)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(names))
    ax.barh(y, values, color=[SELECTED_COLOR if i == 0 else TRIAL_COLOR for i in range(len(names))],
            edgecolor="#333333", linewidth=0.5)
    for yi, value in zip(y, values):
        ax.text(value + 0.01, yi, f"{value:.1%}", va="center", fontsize=9)
    ax.set_yticks(y, [f"{n} (log scale)" if n in importances.log_axes else n for n in names])
    ax.invert_yaxis()
    right = min(1.0, float(values.max()) if len(values) else 1.0) * 1.2 + 0.02  # room for the labels
    ax.set_xlim(0, right)
    ax.set_xticks(np.arange(0, min(right, 1.0) + 1e-9, 0.2 if right > 0.6 else 0.1 if right > 0.25 else 0.05))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0%}"))
    ax.set_xlabel(f"share of the variation of {select_by} explained (sums to 100%)")
    ax.set_title(f"Hyperparameter importance for {select_by}: {importances.method}, {importances.trials} trials\n"
                 f"{select_by} {importances.basis}")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def param_slices(trials: pd.DataFrame, importances: Importances, path: str | os.PathLike[str], *,
                 select_by: str = "val_loss", selected_run_id: str | None = None) -> Path:
    """The objective against each of the two most important axes, one panel each."""
    return save_png(param_slices_figure(trials, importances, select_by=select_by,
                                        selected_run_id=selected_run_id), path)


def param_slices_figure(trials: pd.DataFrame, importances: Importances, *, select_by: str = "val_loss",
                        selected_run_id: str | None = None) -> Figure:
    """Finished trials as dots coloured by trial order (one colour bar), the selected run ringed; a log-scaled
    axis on a log x axis, choices and a list's few numbers as evenly spaced levels (``_levels``)."""
    done = trials[trials["candidate"]].reset_index(drop=True)
    top = importances.names[:2]
    fig = Figure(figsize=(6 * len(top) + 1, 4.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(top), sharey=True))
    y = done["objective"].to_numpy(dtype=float)
    limit = _objective_limit(y, select_by)
    shown = np.minimum(y, limit)
    order = done["trial"].to_numpy(dtype=int)
    share = dict(importances.values)
    last = max(int(trials["trial"].max()), 2)  # the colour scale spans every trial, so colours match the history
    dots = None
    for ax, name in zip(axes, top):
        values = done[name]
        labels = _levels(values)
        if labels is not None:  # choices, or a list's few numbers: evenly spaced, points side by side
            xs = _spread(np.array([labels.index(plain(v)) for v in values.tolist()], dtype=float))
            ax.set_xticks(range(len(labels)), [_label(c) for c in labels])
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            xs = values.to_numpy(dtype=float)
            if name in importances.log_axes:
                ax.set_xscale("log")
        over = y > limit  # on the top edge, as a triangle
        for mask, marker, size, edge, width in ((~over, "o", 45, "#333333", 0.4), (over, "^", 70, VAL_COLOR, 1.2)):
            if mask.any():
                dots = ax.scatter(xs[mask], shown[mask], c=order[mask], cmap="viridis", vmin=1, vmax=last, s=size,
                                  marker=marker, edgecolors=edge, linewidths=width, zorder=3)
        picked = (done["run_id"] == selected_run_id).to_numpy()
        if picked.any():
            ax.plot(xs[picked], shown[picked], "o", markersize=15, markerfacecolor="none", zorder=5,
                    markeredgecolor=SELECTED_COLOR, markeredgewidth=2.2, label="selected")
            ax.legend(fontsize=8, loc="best")
        ax.set_xlabel(f"{name}{' (log scale)' if ax.get_xscale() == 'log' else ''}: importance {share[name]:.0%}")
        ax.grid(True, alpha=0.3)
    _objective_axis(axes[0], shown, limit, select_by)
    if dots is not None:
        fig.colorbar(dots, ax=list(axes), label="trial", pad=0.01)
    fig.suptitle(f"{select_by} against the {len(top)} most important hyperparameters ({len(done)} trials; colour: "
                 f"trial order)\n{select_by} {importances.basis}"
                 + (f"; clipped at {limit:.3g} (^)" if (y > limit).any() else ""))
    return fig


def _levels(values: pd.Series) -> list[Any] | None:
    """The x positions' labels when an axis is drawn as levels, else None (a number line).

    Choices are levels in the order first tried. So are the numbers of a list
    (at most 10 distinct values, each tried more than once somewhere): 32, 64,
    128, 256 evenly spaced read better than crowded at one end of a line. A
    range's values (all distinct) stay on a number line.
    """
    if is_categorical_axis(values):
        return choices(values)
    distinct = sorted(set(plain(v) for v in values.tolist()))
    return distinct if len(distinct) <= 10 and len(distinct) < len(values) else None


def _label(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def _spread(positions: np.ndarray) -> np.ndarray:
    """Points at the same level side by side (in trial order) instead of on top of each other."""
    out = positions.copy()
    for level in np.unique(positions):
        at = np.flatnonzero(positions == level)
        if len(at) > 1:
            width = min(0.3, 0.04 * (len(at) - 1))
            out[at] = level + np.linspace(-width, width, len(at))
    return out
