"""One image file -> a uint8 C x H x W array, the same way for ``prepare`` and ``predict``.

PIL, not ``torchvision.io``: PIL decoded and resized faster in every case
``benchmarks/bench_decode.py`` measured (figures in benchmarks/README.md), it
reads the size from the header before decoding (so a decompression bomb is refused
before it costs memory) and it names a truncated file as truncated
(``torchvision.io`` raises a generic RuntimeError). JPEGs use ``draft``: the decoder scales by 1/2, 1/4 or 1/8
while decoding, never below the target size.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 50_000_000


class ImageProblem(Exception):
    """This file is not a usable image (``reason`` is short: 'truncated', 'not an image', ...)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ImageTooLarge(ImageProblem):
    """Above the pixel cap: refused by name, never skipped quietly (a decompression bomb?)."""


def _flatten_alpha(img: "Image.Image") -> "Image.Image":  # noqa: F821 - PIL imported lazily
    """Transparent pixels become white (not black, which ``convert('RGB')`` would give)."""
    from PIL import Image

    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba)


def to_array(source: bytes | str | Path, channels: int, size: tuple[int, int], *,
             max_pixels: int | None = DEFAULT_MAX_PIXELS, note_resize: bool = True) -> tuple[np.ndarray, list[str]]:
    """Decode ``source`` (file bytes or a path) to uint8 ``channels`` x H x W; also notes on conversions.

    ``size`` is (height, width). Raises ``ImageTooLarge`` above ``max_pixels``
    and ``ImageProblem`` for anything unreadable (not an image, truncated, ...).
    """
    from PIL import Image, UnidentifiedImageError

    height, width = size
    notes: list[str] = []
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as img:
                pixels = img.size[0] * img.size[1]
                if max_pixels is not None and pixels > max_pixels:
                    raise ImageTooLarge(f"{img.size[0]}x{img.size[1]} = {pixels:,} pixels, above data.max_pixels={max_pixels:,}")
                original = img.size
                if img.format == "JPEG":
                    img.draft("L" if channels == 1 else "RGB", (width, height))
                img.load()
                mode = "L" if channels == 1 else "RGB"
                if img.mode.startswith("I;16") or img.mode in ("I", "F"):  # 16-bit/float: rescale, don't clip at 255
                    wide = np.asarray(img, dtype=np.float64)
                    scale = 257.0 if img.mode != "F" else 1.0
                    img = Image.fromarray(np.clip(np.rint(wide / scale), 0, 255).astype(np.uint8), mode="L")
                    notes.append("scaled 16-bit to 8-bit")
                if img.mode != mode:
                    if not (img.mode in ("L", "P", "1") and mode == "L"):
                        notes.append(f"converted {img.mode} to {'grayscale' if mode == 'L' else 'RGB'}")
                    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                        img = _flatten_alpha(img)
                    img = img.convert(mode)
                if img.size != (width, height):
                    if note_resize:
                        notes.append(f"resized {original[0]}x{original[1]} to {width}x{height}")
                    img = img.resize((width, height), Image.Resampling.BILINEAR)
                array = np.asarray(img, dtype=np.uint8)
    except ImageProblem:
        raise
    except UnidentifiedImageError:
        raise ImageProblem("not an image") from None
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"decompression bomb ({err})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        text = str(err).lower()
        raise ImageProblem("truncated" if "truncated" in text else f"unreadable ({type(err).__name__})") from None
    if array.ndim == 2:
        array = array[None]
    else:
        array = array.transpose(2, 0, 1)
    return np.ascontiguousarray(array), notes
