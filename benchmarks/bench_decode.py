"""Decode + resize one image file: PIL (as ``cnnpipe.data.images`` does it) vs ``torchvision.io``.

Why ``prepare`` decodes folder datasets with PIL: this measures, on generated
JPEG and PNG files of a few sizes, single-threaded images per second of

* ``PIL``: open, convert, bilinear resize (antialiased);
* ``PIL+draft``: the same with JPEG ``draft`` (DCT-domain downscaling), what cnnpipe uses;
* ``torchvision``: ``decode_image`` + ``interpolate(antialias=True)``.

Variants are interleaved per repeat; medians and the ratio to ``torchvision``
are printed as a table. Usage: ``python benchmarks/bench_decode.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np


def make(fmt: str, count: int, side: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, side * side * 3).reshape(side, side, 3)
    files = []
    for _ in range(count):
        array = np.clip(base + rng.normal(0, 30, (side, side, 3)), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(array).save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        files.append(out.getvalue())
    return files


def pil(data: bytes, size: tuple[int, int], draft: bool) -> np.ndarray:
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if draft and img.format == "JPEG":
        img.draft("RGB", size)
    return np.asarray(img.convert("RGB").resize(size, Image.Resampling.BILINEAR))


def tv(data: bytes, size: tuple[int, int]) -> object:
    import torch
    import torch.nn.functional as F
    from torchvision.io import ImageReadMode, decode_image

    tensor = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    resized = F.interpolate(tensor[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    cases = [("JPEG", 256, 300, 64), ("PNG", 256, 300, 64), ("JPEG", 1024, 60, 64), ("PNG", 28, 300, 28)]
    print(f"{'file':<14} {'-> px':>5} {'variant':<12} {'img/s':>8} {'x torchvision':>14}")
    for fmt, side, count, target in cases:
        files = make(fmt, count, side)
        size = (target, target)
        variants = {"PIL": lambda d: pil(d, size, False), "PIL+draft": lambda d: pil(d, size, True),
                    "torchvision": lambda d: tv(d, size)}
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                for data in files:
                    fn(data)
                times[name].append(time.perf_counter() - start)
        rates = {name: count / statistics.median(t) for name, t in times.items()}
        for name, rate in rates.items():
            print(f"{fmt + ' ' + str(side) + 'px':<14} {target:>5} {name:<12} {rate:8.0f} {rate / rates['torchvision']:14.2f}")


if __name__ == "__main__":
    main()
