"""``reports/samples.png``: a look at the data before anything is trained on it.

One row per class, labelled with the class name, a few random training
images each: a wrong label mapping, a transposed image or an all-black split
is obvious at a glance. The grid is one mosaic image (one ``imshow``), which
renders in a fraction of the time of one matplotlib axes per image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from cnnpipe.util.files import atomic_path

GAP = 2  # pixels between tiles


def pick_per_class(labels: np.ndarray, num_classes: int, per_class: int, seed: int = 0) -> list[np.ndarray]:
    """Up to ``per_class`` random indices of each class (seeded, so the figure is stable)."""
    rng = np.random.default_rng(seed)
    picks = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        take = min(per_class, members.size)
        picks.append(np.sort(rng.choice(members, size=take, replace=False)))
    return picks


def mosaic(images: np.ndarray, picks: list[np.ndarray], per_class: int, background: int = 255) -> np.ndarray:
    """Tile the picked uint8 N x C x H x W images into one H' x W' x C array, a row per class."""
    _, channels, height, width = images.shape
    rows = len(picks)
    out = np.full(
        (rows * (height + GAP) - GAP, per_class * (width + GAP) - GAP, channels), background, dtype=np.uint8
    )
    for r, indices in enumerate(picks):
        for col, index in enumerate(indices):
            top, left = r * (height + GAP), col * (width + GAP)
            out[top : top + height, left : left + width] = np.transpose(images[index], (1, 2, 0))
    return out


def save_sample_grid(
    path: str | os.PathLike[str],
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    *,
    per_class: int = 8,
    seed: int = 0,
    title: str = "",
) -> None:
    """Write a class-per-row grid of uint8 N x C x H x W ``images`` as a PNG (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = pick_per_class(labels, len(classes), per_class, seed)
    grid = mosaic(images, picks, per_class)
    height = images.shape[2]
    rows = len(classes)
    label_width = 0.09 * max(len(name) for name in classes) + 0.6
    fig_width = label_width + 0.75 * per_class + 0.2
    fig_height = 0.75 * rows + (0.6 if title else 0.2)
    fig = plt.figure(figsize=(fig_width, fig_height))
    ax = fig.add_axes((label_width / fig_width, 0.1 / fig_height, 0.75 * per_class / fig_width, 0.75 * rows / fig_height))
    if grid.shape[2] == 1:
        ax.imshow(grid[:, :, 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_yticks([r * (height + GAP) + height / 2 for r in range(rows)])
    ax.set_yticklabels([f"{name} ({r})" for r, name in enumerate(classes)], fontsize=10)
    ax.tick_params(axis="y", length=0)
    ax.set_xticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.12 / fig_height, va="top")
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
