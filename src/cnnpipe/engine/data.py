"""``TrainData``: a prepared folder held in memory as whole-split tensors.

The engine never uses a DataLoader: each split is one uint8 tensor that is
moved to the training device once, and batches are slices of a seeded
permutation. Images stay uint8 until a batch is normalized, so even
CIFAR-10's training split costs ~150 MB on the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cnnpipe.data.prepared import SPLITS, Split, load_split, load_stats


@dataclass(frozen=True)
class TrainData:
    train: Split
    val: Split
    test: Split | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]
    image_shape: tuple[int, int, int]
    fingerprint: str
    dataset: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @classmethod
    def load(cls, prepared_dir: str | os.PathLike[str], *, splits: tuple[str, ...] = SPLITS) -> "TrainData":
        """Read (and hash-verify) the prepared splits; ``splits`` may omit 'test' to save memory."""
        stats = load_stats(prepared_dir)
        loaded = {name: load_split(prepared_dir, name) for name in splits}
        c, h, w = (int(d) for d in stats.image_shape)
        return cls(
            train=loaded["train"],
            val=loaded["val"],
            test=loaded.get("test"),
            mean=tuple(stats.mean),
            std=tuple(stats.std),
            classes=tuple(stats.classes),
            image_shape=(c, h, w),
            fingerprint=stats.fingerprint,
            dataset=stats.dataset,
        )
