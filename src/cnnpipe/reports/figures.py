"""Report figures: one function per PNG, ``fn(data..., path) -> Path``.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot: no
global state, no GUI backend, no display needed; saving renders with Agg)
and written atomically at a fixed DPI, so a figure's pixel size is
``figsize * DPI`` and tests can check it.
Inputs are the plain tables the train and evaluate stages write
(``history.csv``, ``grid.csv``, ``per_class.csv``, ...), read with pandas.

``draw`` calls a figure function through an ``OutputCache``: a figure whose
inputs (every argument but ``path``, less the columns no figure draws) and
code are unchanged is copied back instead of drawn again (drawing is ~2/3 of
the plots stage; an experiment whose runs all came from the run cache
changes none of its figures).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, PercentFormatter

from cnnpipe.util.files import atomic_path

if TYPE_CHECKING:
    from cnnpipe.store.outputs import OutputCache

DPI = 100
TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#d62728"
TEST_COLOR = "#ff7f0e"
BEST_COLOR = "#555555"
SELECTED_COLOR = "#2ca02c"
OTHER_COLOR = "#9bb7d4"
PRUNED_COLOR = "#d0d0d0"
METRIC_LABELS = {"val_top1": "validation top-1 accuracy", "val_top5": "validation top-5 accuracy",
                 "val_loss": "validation loss"}
# train_loss / train_top1 are running means over the epoch's batches as they were trained (train mode: dropout
# on, batch-norm batch statistics; augmented images; label-smoothed loss); the validation curves are clean
# (eval mode, after the epoch). Labelled so nobody reads the gap between them as over- or underfitting alone.
TRAIN_LABEL = "train (as trained: augmented, train mode)"
VAL_LABEL = "validation (clean, eval mode)"
CURVES_NOTE = ("train curves: running mean over each epoch's batches as trained (augmentation, dropout/batch-norm "
               "in train mode, label smoothing in the loss); validation: after each epoch, eval mode, no augmentation")


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    return target


# Table columns that no figure draws: they change with every execution (MLflow ids, timings, cache flags),
# so they are left out of a figure's cache key. A figure that starts drawing one must drop it from here.
UNDRAWN_COLUMNS = frozenset({"mlflow_run_id", "seconds", "images_per_s", "epoch_seconds", "cached", "resumed_at"})
FIGURE_CACHE_KIND = "figures"
FIGURE_FILE = "figure.png"


def _fingerprint(value: Any) -> Any:
    """A JSON-able stand-in for a figure argument: equal values, equal stand-ins."""
    if isinstance(value, pd.DataFrame):
        frame = value.drop(columns=[c for c in value.columns if c in UNDRAWN_COLUMNS])
        rows = pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes() if len(frame.columns) else b""
        return {"frame": [str(c) for c in frame.columns], "dtypes": [str(t) for t in frame.dtypes],
                "index": str(frame.index.dtype), "rows": len(frame), "hash": _sha(rows)}
    if isinstance(value, pd.Series):
        return {"series": str(value.name), "dtype": str(value.dtype),
                "hash": _sha(pd.util.hash_pandas_object(value, index=True).to_numpy().tobytes())}
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return {"array": list(array.shape), "dtype": str(array.dtype), "hash": _sha(array.tobytes())}
    if isinstance(value, Mapping):
        return {str(k): _fingerprint(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_fingerprint(v) for v in value]
    if isinstance(value, (np.generic,)):
        return repr(value.item())
    return repr(value)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# What draws a figure: this module and everything it may import (codegraph.code_identity).
CODE_ENTRY = "cnnpipe.reports.figures"


@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """The drawing code's identity and matplotlib's version (computed once per process, not once per figure)."""
    import matplotlib

    from cnnpipe.codegraph.code_identity import code_identity

    return f"{code_identity(CODE_ENTRY)}/matplotlib-{matplotlib.__version__}"


def _key(fn: Callable[..., Path], bound: inspect.BoundArguments) -> str:
    from cnnpipe.util.hashing import digest

    bound.apply_defaults()
    arguments = {name: _fingerprint(value) for name, value in bound.arguments.items() if name != "path"}
    return digest({"figure": fn.__qualname__, "code": _code_version(), "dpi": DPI, "arguments": arguments})


def figure_key(fn: Callable[..., Path], *args: Any, **kwargs: Any) -> str:
    """Hash of the figure function, its module's source, matplotlib's version, DPI and every argument but ``path``."""
    return _key(fn, inspect.signature(fn).bind(*args, **kwargs))


def draw(fn: Callable[..., Path], *args: Any, cache: "OutputCache | None" = None, **kwargs: Any) -> Path:
    """``fn(*args, **kwargs)``, or its stored PNG copied to ``path`` when the same inputs were drawn before."""
    if cache is None:
        return fn(*args, **kwargs)
    bound = inspect.signature(fn).bind(*args, **kwargs)
    path = Path(bound.arguments["path"])
    key = _key(fn, bound)
    entry = cache.get(key, [FIGURE_FILE])
    if entry is not None:
        return cache.restore(entry / FIGURE_FILE, path)
    fn(*args, **kwargs)
    cache.put(key, {FIGURE_FILE: path})
    return path


def _epoch_axis(ax, last_epoch: int) -> None:
    """Whole epochs only, with half an epoch of margin (a 1-epoch run is one centred point)."""
    ax.set_xlim(0.5, max(int(last_epoch), 1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)


def _percent_axis(ax, min_span: float = 0.02) -> None:
    """Accuracy axis in %, decimals chosen from the range, and never zoomed below ``min_span``.

    Without the floor a top-5 curve wobbling between 99.6% and 99.7% fills the
    panel and looks like a collapse.
    """
    low, high = ax.get_ylim()
    if high - low < min_span:
        middle = (low + high) / 2
        low, high = middle - min_span / 2, middle + min_span / 2
    pad = 0.03 * (high - low)  # room for a marker sitting exactly at 0% or 100%
    if high > 1.0 + pad:  # accuracies stop at 100%: shift the window down instead of showing 104%
        low, high = low - (high - 1.0 - pad), 1.0 + pad
    if low < -pad:
        low, high = -pad, min(1.0 + pad, high - low - pad)
    ax.set_ylim(low, high)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=None))


def _marker(n_points: int) -> str | None:
    """Dots when there are few epochs, so a 1-epoch run is still visible."""
    return "o" if n_points <= 12 else None


def _mark_best(ax, epoch: int | None, label: bool) -> None:
    if epoch is not None:
        ax.axvline(epoch, color=BEST_COLOR, linestyle=":", linewidth=1.5, label=f"best epoch ({epoch})" if label else None)


# --------------------------------------------------------------------------- learning curves

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
    marker = _marker(len(history))
    for ax, (panel_title, series, ylabel, percent) in zip(axes, CURVE_PANELS):
        for column, label, color in series:
            if column in history:
                ax.plot(history["epoch"], history[column], color=color, marker=marker, markersize=4, label=label)
        if best_epoch is not None:
            _mark_best(ax, best_epoch, label=True)
            row = history[history["epoch"] == best_epoch]
            val_column = series[-1][0]
            if not row.empty and val_column in row:
                ax.plot(best_epoch, float(row[val_column].iloc[0]), marker="*", markersize=14, color=VAL_COLOR,
                        markeredgecolor="black", linestyle="none", zorder=5)
        ax.set_title(panel_title)
        ax.set_ylabel(ylabel)
        _epoch_axis(ax, int(history["epoch"].max()) if len(history) else 1)
        if percent:
            _percent_axis(ax)
        ax.legend(loc="best", fontsize=9)
    subtitle = _stop_text(best_epoch, len(history), stop_reason)
    fig.suptitle(f"{title}\n{subtitle}" if subtitle else title, fontsize=13)
    fig.supxlabel(CURVES_NOTE, fontsize=9, color="#444444")
    return _save(fig, path)


def _stop_text(best_epoch: int | None, epochs_run: int, stop_reason: str | None) -> str:
    parts = []
    if best_epoch is not None:
        parts.append(f"best epoch {best_epoch} of {epochs_run} (star: weights kept)")
    if stop_reason == "early_stopping":
        parts.append(f"early stopping after epoch {epochs_run}")
    elif stop_reason and stop_reason != "max_epochs":
        parts.append(stop_reason.split(":")[0])
    return "; ".join(parts)


def _run_colors(n: int) -> list:
    import matplotlib as mpl

    if n <= 10:
        cmap = mpl.colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = mpl.colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = mpl.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


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
    pruned_at = _pruned_at(grid) if grid is not None else {}
    colors = dict(zip(run_ids, _run_colors(len(run_ids))))
    legend_rows = math.ceil(len(run_ids) / 3) + 1
    fig = Figure(figsize=(15, 4.8 + 0.25 * legend_rows), layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (panel_title, series, ylabel, percent) in zip(axes, CURVE_PANELS):
        for run_id in run_ids:
            run = history[history["run_id"] == run_id].sort_values("epoch")
            selected = run_id == selected_run_id
            width = 2.6 if selected else 1.4
            marker = _marker(len(run))
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
        sane = [r for r in run_ids if status.get(r, "finished") == "finished" or r in pruned_at]
        clipped = not percent and _clip_diverged(ax, history, sane, [c for c, _, _ in series])
        ax.set_title(f"{panel_title} (diverged runs clipped)" if clipped else panel_title)
        ax.set_ylabel(ylabel)
        _epoch_axis(ax, int(history["epoch"].max()) if len(history) else 1)
        if percent:
            _percent_axis(ax)

    def label(run_id: str) -> str:
        extra = "  (selected)" if run_id == selected_run_id else ""
        if run_id in pruned_at:
            extra += f"  (pruned at epoch {pruned_at[run_id]})"
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
    return _save(fig, path)


def _clip_diverged(ax, history: pd.DataFrame, finished: list[str], columns: list[str]) -> bool:
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


# --------------------------------------------------------------------------- per class / confusion


def per_class_bars(per_class: pd.DataFrame, path: str | os.PathLike[str], *, title: str = "Per-class accuracy") -> Path:
    """Horizontal bars per class: train vs test accuracy (columns ``train_accuracy`` and ``accuracy``)."""
    classes = list(per_class["class"].astype(str))
    n = len(classes)
    fig = Figure(figsize=(9, 1.6 + 0.5 * n), layout="constrained")
    ax = fig.subplots()
    y = np.arange(n)
    height = 0.38
    train = per_class["train_accuracy"].to_numpy(dtype=float) if "train_accuracy" in per_class else None
    test = per_class["accuracy"].to_numpy(dtype=float)
    if train is not None:
        ax.barh(y - height / 2, train, height, color=TRAIN_COLOR, label="train")
    bars = ax.barh(y + (height / 2 if train is not None else 0), test, height, color=TEST_COLOR, label="test")
    for bar, value in zip(bars, test):
        ax.text(min(bar.get_width(), 1.0) + 0.01, bar.get_y() + bar.get_height() / 2, f"{value:.1%}",
                va="center", fontsize=8)
    ax.set_yticks(y, classes)
    ax.invert_yaxis()  # first class on top
    ax.set_xlim(0, 1.12)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    ax.set_xticks(np.linspace(0, 1, 6))
    ax.set_xlabel("accuracy (share of the class's images predicted correctly)")
    ax.set_ylabel("class")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=9, frameon=False)  # outside: never hides a bar label
    return _save(fig, path)


def confusion_heatmap(
    confusion: np.ndarray,
    classes: Sequence[str],
    path: str | os.PathLike[str],
    *,
    title: str = "Confusion matrix (test)",
) -> Path:
    """Rows (true class) normalised to 1 for the colour; every cell annotated with its count."""
    counts = np.asarray(confusion, dtype=np.int64)
    n = len(classes)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=float), where=totals > 0)
    side = max(5.0, 2.8 + 0.65 * n)
    fig = Figure(figsize=(side + 1.3, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    colorbar = fig.colorbar(image, ax=ax, shrink=0.8, format=PercentFormatter(1.0, decimals=0))
    colorbar.set_label("share of the true class")
    fontsize = 9 if n <= 12 else max(5, 9 - (n - 12) // 4)
    for i in range(n):
        for j in range(n):
            if counts[i, j] == 0:
                continue
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=fontsize,
                    color="white" if share[i, j] > 0.55 else "black")
    ax.set_xticks(range(n), list(classes), rotation=40, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), list(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"{title}\ncolour: share of each true class; numbers: image counts (blank = 0)", fontsize=11)
    return _save(fig, path)


def confusion_from_pairs(actual: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Counts matrix from ``confusion.csv`` rows (class names), in ``classes`` order."""
    index = {name: i for i, name in enumerate(classes)}
    rows = np.array([index[a] for a in actual], dtype=np.int64)
    cols = np.array([index[p] for p in predicted], dtype=np.int64)
    n = len(classes)
    return np.bincount(rows * n + cols, minlength=n * n).reshape(n, n)


# --------------------------------------------------------------------------- mistakes


def mistakes_grid(
    images: np.ndarray,
    actual: Sequence[str],
    predicted: Sequence[str],
    confidence: Sequence[float],
    path: str | os.PathLike[str],
    *,
    ncols: int = 5,
    title: str = "Most confident mistakes (test)",
) -> Path:
    """Misclassified images (uint8 N x C x H x W) titled with true and predicted class."""
    images = np.asarray(images)
    n = len(images)
    ncols = max(1, min(ncols, n)) if n else 1
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(2.3 * ncols + 0.4, 2.55 * nrows + 0.7), layout="constrained")
    if n == 0:
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no mistakes on the test set", ha="center", va="center", fontsize=11)
        fig.suptitle(title, fontsize=13)
        return _save(fig, path)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, image, true_name, pred_name, conf in zip(axes, images, actual, predicted, confidence):
        if image.shape[0] == 1:
            ax.imshow(image[0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(np.transpose(image[:3], (1, 2, 0)), interpolation="nearest")
        ax.set_title(f"true: {true_name}\npred: {pred_name} ({_confidence(conf)})", fontsize=9, color="#b00020")
    fig.suptitle(f"{title}: true class, predicted class (confidence)", fontsize=13)
    return _save(fig, path)


def _confidence(value: float) -> str:
    """``99.4%``; never a rounded-up ``100%`` for a prediction that was wrong."""
    return ">99.9%" if value >= 0.9995 else f"{value:.1%}"


# --------------------------------------------------------------------------- grid comparison


def grid_comparison(grid: pd.DataFrame, path: str | os.PathLike[str], *, select_by: str = "val_loss",
                    selected_run_id: str | None = None) -> Path:
    """Every grid run's ``select_by`` (at its best epoch) as labelled bars, ranked as the train stage selects.

    The selected (green) run is on top; failed or diverged runs are listed last with their status.
    Trials pruned by successive halving were measured at an earlier epoch: they are not ranked
    with the finalists but set apart below (grey, "pruned at epoch N"), later rungs first.
    """
    return _save(grid_comparison_figure(grid, select_by=select_by, selected_run_id=selected_run_id), path)


def _pruned_at(grid: pd.DataFrame) -> dict[str, int]:
    """Run id -> the epoch successive halving stopped it at (only pruned trials)."""
    if "pruned" not in grid or "epochs_run" not in grid:
        return {}
    flags = grid["pruned"].astype(str).str.lower().isin(("true", "1", "1.0"))  # bools, or text read back from CSV
    return {r: int(e) for r, e, f in zip(grid["run_id"], grid["epochs_run"], flags) if f and pd.notna(e)}


def grid_comparison_figure(grid: pd.DataFrame, *, select_by: str = "val_loss",
                           selected_run_id: str | None = None) -> Figure:
    from cnnpipe.reports.readme import rank_runs

    pruned_at = _pruned_at(grid)
    loss = select_by == "val_loss"
    ranked = rank_runs(grid, select_by)
    finalists = ranked[~ranked["run_id"].isin(list(pruned_at))]
    pruned = grid[grid["run_id"].isin(list(pruned_at))]  # by rung (latest first), then metric: one epoch per rung
    metric = pd.to_numeric(pruned[select_by], errors="coerce").to_numpy(dtype=float) * (1 if loss else -1)
    pruned = pruned.iloc[np.lexsort((np.arange(len(pruned)), np.nan_to_num(metric, nan=np.inf),
                                     [-pruned_at[r] for r in pruned["run_id"]]))]
    table = pd.concat([finalists, pruned])
    other = "val_top1" if loss else "val_loss"
    n = len(table)
    fig = Figure(figsize=(12 if pruned_at else 10, 1.6 + 0.42 * n), layout="constrained")
    ax = fig.subplots()
    y = np.arange(n)
    raw = pd.to_numeric(table[select_by], errors="coerce")
    second = pd.to_numeric(table[other], errors="coerce") if other in table else pd.Series(np.nan, index=table.index)
    values = raw.fillna(0.0).to_numpy()
    colors = [SELECTED_COLOR if r == selected_run_id else PRUNED_COLOR if r in pruned_at else OTHER_COLOR
              for r in table["run_id"]]
    ax.barh(y, values, color=colors, edgecolor="#333333", linewidth=0.5)
    statuses = table["status"] if "status" in table else pd.Series(["finished"] * n, index=table.index)
    sane = values[values <= 10 * np.median(values[values > 0])] if (values > 0).any() else values
    top = float(sane.max()) if n and sane.max() > 0 else 1.0  # a diverging trial's bar runs off the edge
    span = 1.0 if not loss else top
    room = 1.3 if pruned_at else 1.0  # the longer "pruned at epoch N" labels
    for yi, value, main, extra, status, run_id in zip(y, values, raw, second, statuses, table["run_id"]):
        if pd.notna(main):
            text = f"{main:.4f} (top-1 {extra:.2%})" if loss and pd.notna(extra) else (
                f"{main:.2%} (loss {extra:.4f})" if pd.notna(extra) else (f"{main:.4f}" if loss else f"{main:.2%}"))
            if run_id in pruned_at:
                text += f" (pruned at epoch {pruned_at[run_id]})"
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
    if pruned_at:
        ax.axhline(len(finalists) - 0.5, color="0.3", linewidth=1.2)
    ax.set_title(f"{len(finalists)} finalists ranked by select_by: {select_by} (green: selected)\ngrey: {len(pruned)} "
                 "trials pruned earlier, not ranked with them (latest rung first)" if pruned_at else
                 f"{n} grid runs ranked by select_by: {select_by} (green: selected)")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


# --------------------------------------------------------------------------- successive halving


def halving_rungs(history: pd.DataFrame, grid: pd.DataFrame, path: str | os.PathLike[str], *,
                  selected_run_id: str | None = None, select_by: str = "val_loss") -> Path:
    """The rungs of a successive-halving search: ``select_by`` per trial per epoch, pruned trials grey."""
    return _save(halving_rungs_figure(history, grid, selected_run_id=selected_run_id, select_by=select_by), path)


def halving_rungs_figure(history: pd.DataFrame, grid: pd.DataFrame, *, selected_run_id: str | None = None,
                         select_by: str = "val_loss") -> Figure:
    """Pruned curves end at ``x``, rungs at dashed lines; finalists coloured, the selected one thickest.
    A loss axis is logarithmic, capped at 10x the median trial's best loss: one diverged trial (val_loss
    25) would flatten every other curve; its points above the cap are ``^`` on the top edge."""
    pruned = _pruned_at(grid)
    names = dict(zip(grid["run_id"], grid["run_name"]))
    survivors = [r for r in grid["run_id"] if r not in pruned]
    colors = dict(zip(survivors, _run_colors(len(survivors))))
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
            ax.plot(run["epoch"], shown, color="0.7", linewidth=1, marker=_marker(len(run)), markersize=3)
            ax.plot(run["epoch"].iloc[-1], shown[-1], marker="x", color=color, linestyle="none")
        else:
            ax.plot(run["epoch"], shown, color=color, linewidth=3 if selected else 1.8, marker=_marker(len(run)),
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
        _percent_axis(ax)
    _epoch_axis(ax, int(history["epoch"].max()) if len(history) else 1)
    note = f"\n{len(clipped)} diverging trial(s) clipped at {limit:.3g} (^ on the top edge)" if clipped else ""
    ax.set_title(f"Successive halving: {len(grid)} trials, rungs end at epochs {', '.join(map(str, stops)) or '-'}{note}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig
