"""One prepared split file (``train.safetensors``): written in chunks, read memory-mapped.

The file is a plain safetensors file (``labels``: int64 N, ``images``: uint8
N x C x H x W) and stays readable by the safetensors library, but cnnpipe
never loads it whole: the writer streams image rows into it (so ``prepare``
holds one chunk, not the dataset), and the reader parses the JSON header and
maps the ``images`` bytes with ``np.memmap``. safetensors stores each tensor
contiguous and row-major at ``8 + header_len + data_offsets[0]``, so the
mapped array *is* the tensor. The OS page cache then holds what fits, shared
by every process on the machine that maps the same file (parallel grid
workers), and a split larger than RAM is read from disk as batches need it.

The writer's bytes equal ``safetensors.numpy.save_file``'s for the same
arrays (tested), so the benchmark datasets' prepare and a folder's prepare
write one format, and hashes stay stable from run to run.

Nothing here trusts the file: the header must be a JSON object naming
exactly these two tensors with these dtypes, their byte ranges must follow
from their shapes, and the file's size must be exactly what the header
says. A truncated, padded or foreign file is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnpipe.data.resident_pages import register
from cnnpipe.util.errors import DataError

HEADER_LIMIT = 100_000_000  # the safetensors library refuses larger headers too
CHUNK_BYTES = 64 * 1024 * 1024  # image bytes per write / per statistics pass: flat memory, few syscalls


class SplitFileError(DataError):
    """A split file is not a well-formed cnnpipe split (truncated, foreign, not safetensors)."""


@dataclass(frozen=True)
class Layout:
    """Where a split's tensors lie in its file."""

    count: int
    image_shape: tuple[int, int, int]
    images_at: int  # absolute byte offset of the uint8 images
    labels_at: int  # absolute byte offset of the int64 labels
    size: int  # the file's exact size


def header_bytes(count: int, image_shape: tuple[int, ...], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header that ``safetensors`` writes for labels + images (space-padded to 8)."""
    label_bytes = 8 * count
    image_bytes = count * int(np.prod(image_shape, dtype=np.int64))
    header = {
        "__metadata__": metadata,
        "labels": {"dtype": "I64", "shape": [count], "data_offsets": [0, label_bytes]},
        "images": {"dtype": "U8", "shape": [count, *map(int, image_shape)],
                   "data_offsets": [label_bytes, label_bytes + image_bytes]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text


class SplitWriter:
    """Write one split file a chunk of image rows at a time, hashing the bytes as they go.

    The labels (8 bytes an image) are known up front and written first, as
    safetensors orders them (int64 before uint8); ``write`` appends image
    rows in order; ``close`` checks the row count and returns the SHA-256.
    """

    def __init__(self, path: str | os.PathLike[str], labels: np.ndarray, image_shape: tuple[int, ...],
                 metadata: dict[str, str]) -> None:
        self.path = Path(path)
        self.count = int(labels.shape[0])
        self.row = int(np.prod(image_shape, dtype=np.int64))
        self.image_shape = tuple(int(d) for d in image_shape)
        self.written = 0
        self.digest = hashlib.sha256()
        self.handle = open(self.path, "wb")
        self._put(header_bytes(self.count, self.image_shape, metadata))
        self._put(np.ascontiguousarray(labels, dtype="<i8").tobytes())

    def _put(self, data: bytes | memoryview) -> None:
        self.handle.write(data)
        self.digest.update(data)

    def write(self, rows: np.ndarray) -> None:
        if rows.dtype != np.uint8 or tuple(rows.shape[1:]) != self.image_shape:
            raise ValueError(f"rows must be uint8 x {self.image_shape}, got {rows.dtype} {rows.shape}")
        if self.written + rows.shape[0] > self.count:
            raise ValueError(f"{self.path}: more than the {self.count} rows declared")
        self._put(memoryview(np.ascontiguousarray(rows)).cast("B"))
        self.written += int(rows.shape[0])

    def close(self) -> str:
        """Flush, check every declared row was written, and return the file's SHA-256."""
        self.handle.close()
        if self.written != self.count:
            raise ValueError(f"{self.path}: {self.written} rows written of {self.count} declared")
        return self.digest.hexdigest()

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.handle.closed:
            self.handle.close()


def chunk_rows(image_shape: tuple[int, ...]) -> int:
    """Rows per chunk: about ``CHUNK_BYTES`` of images, at least one."""
    return max(1, CHUNK_BYTES // max(1, int(np.prod(image_shape, dtype=np.int64))))


def write_split(path: str | os.PathLike[str], images: np.ndarray, labels: np.ndarray,
                metadata: dict[str, str]) -> str:
    """Write in-memory (or mapped) arrays as a split file, a chunk at a time; return its SHA-256."""
    step = chunk_rows(images.shape[1:])
    with SplitWriter(path, labels, images.shape[1:], metadata) as writer:
        for start in range(0, images.shape[0], step):
            writer.write(images[start:start + step])
        return writer.close()


def _refuse(path: Path, why: str) -> SplitFileError:
    return SplitFileError(f"{path} is unreadable ({why}); re-run the prepare stage (dvc repro -f prepare)")


def _entry(header: dict, name: str, dtype: str, ndim: int, path: Path) -> tuple[list[int], list[int]]:
    entry = header.get(name)
    if not isinstance(entry, dict) or entry.get("dtype") != dtype:
        raise _refuse(path, f"no {dtype} tensor {name!r}: not a cnnpipe split")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if (not isinstance(shape, list) or len(shape) != ndim or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)):
        raise _refuse(path, f"malformed header entry for {name!r}")
    return shape, offsets


def read_layout(path: str | os.PathLike[str]) -> Layout:
    """Parse and check a split file's header against its size; refuse in one line what does not add up."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                raise _refuse(path, f"{size} bytes: too short for a safetensors header")
            (length,) = struct.unpack("<Q", head)
            if length > min(HEADER_LIMIT, size - 8):
                raise _refuse(path, f"header length {length} does not fit the file's {size} bytes: "
                                    "truncated or not a safetensors file")
            raw = handle.read(length)
    except OSError as err:
        raise _refuse(path, err.strerror or type(err).__name__) from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _refuse(path, "its header is not JSON: not a safetensors file") from None
    if not isinstance(header, dict):
        raise _refuse(path, "its header is not a JSON object")
    extra = sorted(set(header) - {"__metadata__", "images", "labels"})
    if extra:
        raise _refuse(path, f"unexpected tensors {extra[:3]}: not a cnnpipe split")
    label_shape, label_at = _entry(header, "labels", "I64", 1, path)
    image_shape, image_at = _entry(header, "images", "U8", 4, path)
    count = image_shape[0]
    row = image_shape[1] * image_shape[2] * image_shape[3]
    if label_shape[0] != count:
        raise _refuse(path, f"{label_shape[0]} labels for {count} images")
    if label_at[1] - label_at[0] != 8 * count or image_at[1] - image_at[0] != row * count or min(*label_at, *image_at) < 0:
        raise _refuse(path, "its byte ranges do not match the tensor shapes")
    start = 8 + length
    expected = start + max(label_at[1], image_at[1])
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise _refuse(path, f"{what}: {size:,} bytes, its header describes {expected:,}")
    return Layout(count=count, image_shape=(image_shape[1], image_shape[2], image_shape[3]),
                  images_at=start + image_at[0], labels_at=start + label_at[0], size=size)


def read_labels(path: str | os.PathLike[str], layout: Layout) -> np.ndarray:
    """The int64 labels, read into memory (8 bytes an image)."""
    with open(path, "rb") as handle:
        handle.seek(layout.labels_at)
        data = handle.read(8 * layout.count)
    if len(data) != 8 * layout.count:
        raise _refuse(Path(path), "truncated while reading its labels")
    return np.frombuffer(data, dtype="<i8").astype(np.int64)


def map_images(path: str | os.PathLike[str], layout: Layout) -> np.ndarray:
    """The uint8 N x C x H x W images, memory-mapped copy-on-write (``mode='c'``).

    Copy-on-write, not read-only: pages nobody writes are the page cache's,
    shared by every process mapping the file; a stray in-place write (never
    done by cnnpipe) would stay private to its process instead of crashing it
    (read-only pages) or changing the file. The mapping is registered with
    ``resident_pages``, so a loop over a large split keeps only a budget of
    its pages mapped. An empty split is a plain array.
    """
    shape = (layout.count, *layout.image_shape)
    if layout.count == 0 or 0 in layout.image_shape:
        return np.zeros(shape, dtype=np.uint8)
    array = np.memmap(path, dtype=np.uint8, mode="c", offset=layout.images_at, shape=shape)
    register(array)  # so the loops reading it can give its pages back (data.resident_pages)
    return array


def as_tensor(array: np.ndarray):  # type: ignore[no-untyped-def]
    """``torch.from_numpy`` of a mapped array: a view, no copy."""
    import torch

    with warnings.catch_warnings():  # memmap subclasses ndarray; torch only warns for non-writable arrays
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)
