"""The test set by class: per-class accuracy, the confusion matrix, and the most confident mistakes.

Drawn from the evaluate stage's reports (``per_class.csv``, ``confusion.csv``,
``mistakes.csv``) and the prepared test images: what the selected model gets
right and wrong on images no selection step ever saw.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

from cnnpipe.figures.figure_style import TEST_COLOR, TRAIN_COLOR, save_png


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
    return save_png(fig, path)


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
    return save_png(fig, path)


def confusion_from_pairs(actual: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Counts matrix from ``confusion.csv`` rows (class names), in ``classes`` order."""
    index = {name: i for i, name in enumerate(classes)}
    rows = np.array([index[a] for a in actual], dtype=np.int64)
    cols = np.array([index[p] for p in predicted], dtype=np.int64)
    n = len(classes)
    return np.bincount(rows * n + cols, minlength=n * n).reshape(n, n)


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
        return save_png(fig, path)
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
    return save_png(fig, path)


def _confidence(value: float) -> str:
    """``99.4%``; never a rounded-up ``100%`` for a prediction that was wrong."""
    return ">99.9%" if value >= 0.9995 else f"{value:.1%}"
