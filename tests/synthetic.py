"""Tiny, learnable synthetic image datasets for fast tests.

Each class is a distinct fixed pattern plus seeded noise, so a small CNN
learns it in an epoch or two, and everything is deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnpipe.data.prepared import PreparedStats, write_prepared

if TYPE_CHECKING:
    from cnnpipe.params.schema import Params

# A 4-channel conv net that learns the synthetic patterns in an epoch or two.
TINY = [{"conv": 4, "kernel": 3}, "relu", {"maxpool": 2}, "flatten", "linear"]


def tiny_params(**changes: Any) -> "Params":
    """Parsed params for a 2x2 lr x batch_size grid of ``TINY`` (2 epochs); ``changes`` replace top-level keys."""
    from cnnpipe.params.load import parse_params

    raw = {"model": "tiny", "models": {"tiny": TINY}, "lr": [0.05, 0.01], "batch_size": [32, 64], "epochs": 2,
           "patience": 5, "data": {"dataset": "fashion-mnist"}} | changes
    return parse_params(raw)


def make_images(n: int, shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10, seed: int = 0,
                noise: float = 40.0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images (N x C x H x W) and balanced int64 labels."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(1234).uniform(0, 255, size=(num_classes, *shape))
    labels = np.arange(n, dtype=np.int64) % num_classes
    rng.shuffle(labels)
    images = patterns[labels] + rng.normal(0, noise, size=(n, *shape))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def make_prepared(out_dir: str | Path, *, n_train: int = 600, n_val: int = 100, n_test: int = 200,
                  shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10, seed: int = 0,
                  dataset: str = "fashion-mnist") -> PreparedStats:
    """Write a prepared-data folder (same format as the prepare stage) of synthetic images."""
    splits = {
        "train": make_images(n_train, shape, num_classes, seed),
        "val": make_images(n_val, shape, num_classes, seed + 1),
        "test": make_images(n_test, shape, num_classes, seed + 2),
    }
    classes = [f"class{i}" for i in range(num_classes)]
    return write_prepared(out_dir, splits, dataset=dataset, classes=classes, split_seed=seed)
