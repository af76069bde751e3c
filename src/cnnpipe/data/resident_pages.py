"""How much of a memory-mapped split one process keeps resident: ``ResidentCap``.

A mapped split's pages belong to the page cache, yet every page a process
has touched counts in its resident size (``VmRSS``, peak ``VmHWM``) until the
kernel reclaims it. One epoch over a 4 GB split would then show a 4 GB
process, although none of it is the process's own, and container limits,
schedulers and ``top`` read that figure. So the loops that read a split
(training batches, evaluation, backbone features) report what they read to
a ``ResidentCap``: once the process maps ``BUDGET_BYTES`` more of files
than when the loop began, it drops this process's mapping of the split's
pages (``madvise(MADV_DONTNEED)``). The pages stay in the page cache; the next
access maps them again with a minor fault and reads nothing from disk while
they fit in RAM. The values read are unchanged (cnnpipe never writes a
mapped split, so a private mapping's pages always equal the file's). A split
no larger than the budget is never touched, so datasets that fit keep their
speed.

Why not ``mmap`` in numpy alone: ``np.memmap`` has no way to give pages back
short of closing the map, which the tensors viewing it forbid.
"""

from __future__ import annotations

import mmap
import weakref
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

BUDGET_BYTES = 256 * 1024 * 1024  # pages of one split a process keeps mapped at most (then drops them)
PAGE = mmap.PAGESIZE

# Start address of each mapped split -> (end address, the mapping). Weak: a split no one holds is unmapped.
_MAPPED: dict[int, tuple[int, weakref.ref[np.memmap]]] = {}


def register(array: np.memmap) -> None:
    """Remember a mapped split (``split_file.map_images``) so loops over its tensor can drop its pages."""
    start = int(array.ctypes.data)
    for key in [k for k, (_, ref) in _MAPPED.items() if ref() is None]:
        del _MAPPED[key]
    _MAPPED[start] = (start + int(array.nbytes), weakref.ref(array))


def mapping_of(images: torch.Tensor) -> np.memmap | None:
    """The registered mapped split that ``images`` views, or None (an in-memory tensor, a GPU copy)."""
    if images.device.type != "cpu":
        return None
    address = int(images.data_ptr())
    for start, (end, ref) in _MAPPED.items():
        array = ref()
        if array is not None and start <= address < end:
            return array
    return None


def drop(array: np.memmap) -> None:
    """Unmap this process's resident pages of ``array``'s mapping; the page cache keeps them."""
    handle = getattr(array, "_mmap", None)  # np.memmap keeps its mmap.mmap here
    if handle is not None and hasattr(handle, "madvise"):
        handle.madvise(mmap.MADV_DONTNEED)


def mapped_file_bytes() -> int | None:
    """This process's resident file-backed and shared bytes (``/proc/self/statm``'s third field), or None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[2]) * PAGE
    except (OSError, IndexError, ValueError):
        return None


class ResidentCap:
    """Drops a split's mapped pages once this process maps ``budget`` more file bytes than when it began.

    Measured, not estimated: the kernel maps a whole page-cache folio (up to
    2 MB on ext4) for one image read at random, so rows x row size
    underestimates what a shuffled epoch maps many times over (figure in
    benchmarks/README.md). ``/proc/self/statm`` is one short read per batch. Where it does not exist, rows read x their
    pages stand in.
    """

    def __init__(self, images: torch.Tensor, budget: int | None = None) -> None:
        self.budget = BUDGET_BYTES if budget is None else int(budget)
        size = images.numel() * images.element_size()
        self.array = mapping_of(images) if size > self.budget else None
        row = size // max(1, int(images.shape[0])) if images.dim() else size
        self.row_pages = -(-row // PAGE) + 1  # a row not aligned to pages can straddle one more
        self.base = mapped_file_bytes() if self.array is not None else None
        self.touched = 0

    def read(self, rows: int) -> None:
        """``rows`` rows were just read from the split (gathered or sliced)."""
        if self.array is None:
            return
        if self.base is not None:
            now = mapped_file_bytes()
            over = now is not None and now - self.base >= self.budget
        else:
            self.touched += rows * self.row_pages * PAGE
            over = self.touched >= self.budget
        if over:
            drop(self.array)
            self.touched = 0
