"""The house style every report figure shares: size, colours, labels, axes, and how a PNG is written.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot: no
global state, no GUI backend, no display needed; saving renders with Agg)
and written atomically at a fixed DPI, so a figure's pixel size is
``figsize * DPI`` and tests can check it. Kept in one place so that the
train and validation colours, say, mean the same in every figure.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib as mpl
from matplotlib.ticker import MaxNLocator, PercentFormatter

from cnnpipe.util.files import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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


def save_png(fig: "Figure", path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` at ``DPI`` on white, atomically: a reader (or a failed write) never sees half a PNG."""
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="white")
    return target


def epoch_axis(ax: "Axes", last_epoch: int) -> None:
    """Whole epochs only, with half an epoch of margin (a 1-epoch run is one centred point)."""
    ax.set_xlim(0.5, max(int(last_epoch), 1) + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)


def percent_axis(ax: "Axes", min_span: float = 0.02) -> None:
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


def point_marker(n_points: int) -> str | None:
    """Dots when there are few epochs, so a 1-epoch run is still visible."""
    return "o" if n_points <= 12 else None


def mark_best(ax: "Axes", epoch: int | None, label: bool) -> None:
    """A dotted vertical line at the best epoch (the weights kept), labelled once per figure."""
    if epoch is not None:
        ax.axvline(epoch, color=BEST_COLOR, linestyle=":", linewidth=1.5, label=f"best epoch ({epoch})" if label else None)


def run_colors(n: int) -> list:
    """One colour per run: distinct qualitative colours up to 20 runs, a continuous map beyond."""
    if n <= 10:
        cmap = mpl.colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = mpl.colormaps["tab20"]
        return [cmap(i) for i in range(n)]
    cmap = mpl.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]
