"""``TrainData``: a prepared folder as whole-split tensors, memory-mapped.

The engine never uses a DataLoader: each split is one uint8 tensor, and
batches are gathered from it by a seeded permutation. The tensors map the
split files (``data.split_file``): on the CPU a batch is gathered straight
from the page cache (no copy of the split; a split larger than RAM is read
from disk as needed), on CUDA the split moves to the GPU once when it fits.
Images stay uint8 until a batch is normalized, so even CIFAR-10's training
split costs ~150 MB on the device.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cnnpipe.compute.device import is_cuda
from cnnpipe.data.prepared import SPLITS, Split, load_split, load_stats

if TYPE_CHECKING:
    import torch


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
    def load(cls, prepared_dir: str | os.PathLike[str], *, splits: tuple[str, ...] = SPLITS,
             mmap: bool = True) -> "TrainData":
        """Map (and hash-verify) the prepared splits; ``splits`` may omit 'test'.

        ``mmap=False`` reads them into memory instead (the same values; kept
        to compare the two paths).
        """
        stats = load_stats(prepared_dir)
        loaded = {name: load_split(prepared_dir, name, mmap=mmap) for name in splits}
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


def on_device(images: torch.Tensor, dev: str) -> torch.Tensor:
    """The split where batches are gathered from.

    On the CPU: the (memory-mapped) split itself, never copied; a batch is
    gathered from the page cache. On CUDA: moved to the GPU once when it
    fits in half its free memory (the fast path); a larger split stays on
    the host and each batch is gathered there and moved on its own.
    """
    import torch

    if not is_cuda(dev) or images.is_cuda:
        return images.to(dev)
    free, _ = torch.cuda.mem_get_info(torch.device(dev))
    if images.numel() * images.element_size() <= free // 2:
        return images.to(dev, non_blocking=True)
    return images


def gather(split: torch.Tensor, idx: torch.Tensor, dev: str) -> torch.Tensor:
    """``split[idx]`` on ``dev``: one gather; from a host split the index goes there and the batch comes back."""
    if split.device == idx.device:
        return split[idx]
    return split[idx.to(split.device)].to(dev, non_blocking=True)
