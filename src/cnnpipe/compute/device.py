"""Device choice and CPU thread limits.

``params.yaml`` says ``device: auto | cpu | cuda``; ``resolve_device`` turns
that into a concrete torch device string once, with a one-line error when a
GPU is asked for but absent. ``thread_limit`` caps torch's intra-op threads
for one run (grid workers share the cores) and restores the old value, so a
library call leaves no global state behind.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from cnnpipe.util.errors import ParamsError


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda[:N]`` must exist."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return "cuda" if cuda_available() else "cpu"
    if name == "cpu":
        return "cpu"
    if name == "cuda" or name.startswith("cuda:"):
        if not cuda_available():
            raise ParamsError(f"device is {name!r} but torch sees no CUDA GPU; set device: auto (or cpu), or install a CUDA build of torch")
        return name
    raise ParamsError(f"device must be auto, cpu or cuda, got {device!r}")


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def default_threads() -> int:
    """Usable cores for this process (respects CPU affinity / container limits)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS/Windows
        return max(1, os.cpu_count() or 1)


@contextlib.contextmanager
def thread_limit(num_threads: int | None) -> Iterator[int]:
    """Run the block with ``torch.set_num_threads(num_threads)``; ``None`` keeps the current value."""
    import torch

    before = torch.get_num_threads()
    if num_threads is not None and num_threads > 0 and num_threads != before:
        torch.set_num_threads(int(num_threads))
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def configure_backend(device: str) -> None:
    """Fast kernels on CUDA: cuDNN autotuning and TF32 matmuls (bf16 autocast does the rest)."""
    import torch

    if is_cuda(device):
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def describe(device: str) -> str:
    """Human-readable device name for logs, e.g. ``cuda (NVIDIA H200)`` or ``cpu (2 threads)``."""
    import torch

    if is_cuda(device):
        index = torch.device(device).index or 0
        return f"{device} ({torch.cuda.get_device_name(index)})"
    return f"cpu ({torch.get_num_threads()} threads)"
