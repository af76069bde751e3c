"""Small class-per-folder image trees (real PNG/JPEG files) for the folder-dataset tests."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {"cat": (220, 40, 40), "dog": (40, 220, 40), "owl": (40, 40, 220)}


def image_bytes(color: tuple[int, int, int], *, seed: int, size: tuple[int, int] = (40, 30), fmt: str = "PNG",
                mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    array = np.clip(np.array(color) + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(array)
    if mode != "RGB":
        img = img.convert(mode)
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def make_tree(root: Path, per_class: dict[str, int], *, start: int = 0) -> Path:
    """``root/<class>/<i>.png|jpg`` (alternating formats), distinct images per class."""
    for cls, count in per_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + count):
            fmt = "PNG" if i % 2 else "JPEG"
            suffix = ".png" if fmt == "PNG" else ".jpg"
            (root / cls / f"{i:03d}{suffix}").write_bytes(image_bytes(COLORS[cls], seed=zlib.crc32(f"{cls}{i}".encode()), fmt=fmt))
    return root
