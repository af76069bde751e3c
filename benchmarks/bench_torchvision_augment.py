"""Per-image ``torchvision.transforms.v2`` crop+flip against cnnpipe's batched ``augment`` (issue 14.5).

A v2 transform called on a batched tensor draws ONE crop/flip for the whole
batch, so per-image augmentation with v2 means a Python loop over images.
Prints images/s of both on the same uint8 batches (CPU), side by side.

    PYTHONPATH=src python benchmarks/bench_torchvision_augment.py
"""

from __future__ import annotations

import time

import torch
from torchvision.transforms import v2

from cnnpipe.engine.augment import augment


def rate(fn, images: torch.Tensor, repeats: int = 5) -> float:
    fn(images)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn(images)
    return repeats * len(images) / (time.perf_counter() - start)


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    for shape in ((1, 28, 28), (3, 32, 32)):
        images = torch.randint(0, 256, (1000, *shape), dtype=torch.uint8)
        padding = 2 if shape[1] < 32 else 4
        generator = torch.Generator().manual_seed(0)
        per_image = v2.Compose([v2.RandomCrop(shape[1:], padding=padding), v2.RandomHorizontalFlip()])
        batched = rate(lambda x: augment(x, "crop_flip", generator), images)
        looped = rate(lambda x: torch.stack([per_image(img) for img in x]), images)
        rows.append((f"{shape[0]}x{shape[1]}x{shape[2]}", batched, looped))
    print(f"{'images':<9} {'cnnpipe batched img/s':>22} {'v2 per-image img/s':>19} {'ratio':>7}")
    for name, batched, looped in rows:
        print(f"{name:<9} {batched:>22,.0f} {looped:>19,.0f} {batched / looped:>6.1f}x")


if __name__ == "__main__":
    main()
