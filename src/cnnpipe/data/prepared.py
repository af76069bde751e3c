"""The prepared-data format: what ``prepare`` writes and every later stage reads.

``data/prepared/`` holds ``train|val|test.safetensors`` (``images``: uint8
N x C x H x W, ``labels``: int64 N) and ``stats.json`` (dataset, classes,
shape, per-channel mean/std of the *train* split, sizes, and a SHA-256 of
every split file). safetensors holds plain tensors only: nothing in it can
run code. Splits are written in chunks and read memory-mapped
(``split_file``): a split may be larger than RAM, and the processes of one
machine share one copy of it in the page cache.

Loading checks each split against ``stats.json`` (layout and exact size,
hash, shape, label range), so a truncated file or one swapped in from
another dataset is refused, not trained on.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cnnpipe.data.split_file import Layout, as_tensor, chunk_rows, map_images, read_labels, read_layout, write_split
from cnnpipe.util.errors import DataError
from cnnpipe.util.files import atomic_path, atomic_write_json
from cnnpipe.util.hashing import digest, sha256_file

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "val", "test")
STATS_FILE = "stats.json"
FORMAT = "cnnpipe-prepared/1"


@dataclass(frozen=True)
class PreparedStats:
    dataset: str
    classes: list[str]
    image_shape: list[int]  # C, H, W
    mean: list[float]  # per channel, pixel values scaled to [0, 1], train split only
    std: list[float]
    sizes: dict[str, int]
    files: dict[str, str]  # split file name -> sha256
    split_seed: int = 0
    val_fraction: float = 0.1
    sources: dict[str, str] = field(default_factory=dict)  # raw file -> content sha256
    format: str = FORMAT

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> str:
        """One digest naming this exact prepared data (the data version)."""
        return digest(sorted(self.files.items()), length=16)


@dataclass(frozen=True)
class Split:
    images: "torch.Tensor"  # uint8, N x C x H x W
    labels: "torch.Tensor"  # int64, N

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class ChannelHistogram:
    """Per-channel mean and std of uint8 images, accumulated a chunk of images at a time.

    Counted from a 256-bin histogram per channel: exact, and much faster
    than converting Fashion-MNIST's 42M pixels to float64 (figures in
    benchmarks/README.md). Chunks keep memory flat, so ``prepare`` can count
    a split as it streams it to disk and a mapped split is never copied
    whole.
    """

    def __init__(self, channels: int) -> None:
        self.counts = np.zeros((channels, 256), dtype=np.int64)

    def add(self, images: np.ndarray) -> None:
        """Count a uint8 N x C x H x W chunk (no more than ~``CHUNK_BYTES``: each channel plane is copied once)."""
        for c in range(images.shape[1]):
            self.counts[c] += np.bincount(np.ascontiguousarray(images[:, c]).reshape(-1), minlength=256)

    def result(self) -> tuple[list[float], list[float]]:
        values = np.arange(256, dtype=np.float64)
        mean, std = [], []
        for row in self.counts.astype(np.float64):
            total = row.sum()
            mu = float((row * values).sum() / total)
            var = max(float((row * values**2).sum() / total) - mu * mu, 0.0)
            mean.append(mu / 255.0)
            std.append(float(np.sqrt(var)) / 255.0)
        return mean, std


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 N x C x H x W images, on the [0, 1] scale, a chunk at a time."""
    histogram = ChannelHistogram(images.shape[1])
    step = chunk_rows(images.shape[1:])
    for start in range(0, images.shape[0], step):
        histogram.add(images[start:start + step])
    return histogram.result()


def write_prepared(
    out_dir: str | os.PathLike[str],
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    dataset: str,
    classes: list[str],
    split_seed: int = 0,
    val_fraction: float = 0.1,
    sources: dict[str, str] | None = None,
) -> PreparedStats:
    """Write the splits and ``stats.json`` (mean/std from ``splits['train']`` only).

    Each split is streamed to its file a chunk at a time (``split_file``),
    so ``images`` may be a memory map larger than RAM.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for name in SPLITS:
        images, labels = splits[name]
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"{name} images must be uint8 N x C x H x W, got {images.dtype} {images.shape}")
        file_name = f"{name}.safetensors"
        with atomic_path(out / file_name) as tmp:
            # One metadata key only: safetensors writes metadata in hash-map order, so several keys
            # would make identical data hash differently from run to run (breaks DVC/run cache).
            files[file_name] = write_split(tmp, images, labels.astype(np.int64), {"format": FORMAT})
        sizes[name] = int(labels.shape[0])
    mean, std = channel_stats(splits["train"][0])
    return finish_prepared(out, dataset=dataset, classes=classes, image_shape=splits["train"][0].shape[1:],
                           mean=mean, std=std, sizes=sizes, files=files, split_seed=split_seed,
                           val_fraction=val_fraction, sources=sources)


def finish_prepared(out_dir: str | os.PathLike[str], *, dataset: str, classes: list[str],
                    image_shape: tuple[int, ...], mean: list[float], std: list[float], sizes: dict[str, int],
                    files: dict[str, str], split_seed: int, val_fraction: float,
                    sources: dict[str, str] | None) -> PreparedStats:
    """Write ``stats.json`` for split files already written (by ``write_prepared`` or a streaming prepare)."""
    stats = PreparedStats(
        dataset=dataset,
        classes=list(classes),
        image_shape=[int(d) for d in image_shape],
        mean=mean,
        std=std,
        sizes=sizes,
        files=files,
        split_seed=split_seed,
        val_fraction=val_fraction,
        sources=dict(sources or {}),
    )
    atomic_write_json(Path(out_dir) / STATS_FILE, asdict(stats))
    return stats


def load_stats(prepared_dir: str | os.PathLike[str]) -> PreparedStats:
    path = Path(prepared_dir) / STATS_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} is missing; run the prepare stage first (dvc repro prepare)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({err}); re-run the prepare stage (dvc repro -f prepare)") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise DataError(f"{path} is not a cnnpipe prepared-data file; re-run the prepare stage (dvc repro -f prepare)")
    try:
        return PreparedStats(**raw)
    except TypeError as err:
        raise DataError(f"{path} has unexpected fields ({err}); re-run the prepare stage") from None


# Digests of split files hashed by this process, keyed by file identity (see ``split_digest``).
_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}
RACY_SECONDS = 2.0  # a file modified this recently is re-hashed on every load (its mtime may not change on a rewrite)


def file_identity(path: str | os.PathLike[str]) -> tuple[str, int, int, int, int]:
    """(path, device, inode, size, mtime_ns): changes whenever the file is replaced or rewritten."""
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def split_digest(path: str | os.PathLike[str]) -> str:
    """The file's SHA-256, hashed once per process per file version.

    A 4 GB split takes seconds to hash and every worker process loads it, so
    the digest is remembered under the file's identity (inode, size, mtime):
    a replaced file (prepare writes atomically: a new inode) or a rewritten
    one (new size or mtime) is hashed again. As git does for its index, a
    file modified within ``RACY_SECONDS`` is not remembered, since a rewrite
    inside one timestamp tick could keep its mtime.
    """
    key = file_identity(path)
    if key in _DIGESTS:
        return _DIGESTS[key]
    digest = sha256_file(path)
    if time.time() - key[4] / 1e9 > RACY_SECONDS:
        _DIGESTS[key] = digest
    return digest


def known_digests(prepared_dir: str | os.PathLike[str]) -> list[tuple[tuple[str, int, int, int, int], str]]:
    """The remembered digests of ``prepared_dir``'s split files, to hand to worker processes (``trust_digests``)."""
    folder = str(Path(prepared_dir).resolve())
    return [(key, digest) for key, digest in _DIGESTS.items() if os.path.dirname(key[0]) == folder]


def trust_digests(entries: list[tuple[tuple[str, int, int, int, int], str]]) -> None:
    """Adopt digests a parent process computed: a worker then skips re-hashing files whose identity still matches."""
    for key, digest in entries:
        _DIGESTS[tuple(key)] = digest  # type: ignore[index]


def _checked_layout(prepared_dir: str | os.PathLike[str], split: str, verify: bool) -> tuple[PreparedStats, Path, Layout]:
    """The split file's layout, after the checks every reader makes (see ``load_split``)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    stats = load_stats(prepared_dir)
    file_name = f"{split}.safetensors"
    path = Path(prepared_dir) / file_name
    if not path.is_file():
        raise DataError(f"{path} is missing; re-run the prepare stage (dvc repro -f prepare)")
    layout = read_layout(path)
    if verify and split_digest(path) != stats.files.get(file_name):
        raise DataError(
            f"{path} does not match stats.json (different content: swapped or modified); "
            "re-run the prepare stage (dvc repro -f prepare) or dvc checkout data/prepared"
        )
    expected = tuple(stats.image_shape)
    if layout.image_shape != expected or layout.count != stats.sizes.get(split):
        raise DataError(
            f"{path} holds {(layout.count, *layout.image_shape)} images but stats.json says {stats.sizes.get(split)} x "
            f"{expected} for {stats.dataset}; re-run the prepare stage"
        )
    return stats, path, layout


def load_split(prepared_dir: str | os.PathLike[str], split: str, *, verify: bool = True, mmap: bool = True) -> Split:
    """One split as tensors, its images memory-mapped; refuse a file that does not match ``stats.json``.

    Always checked, in one line each: the file parses as a cnnpipe split,
    its size is exactly what its header says (a truncated file is refused),
    its shape and count are what ``stats.json`` says, its labels are in range.
    ``verify`` adds the content check: the file's SHA-256 must be the one in
    ``stats.json`` (hashed once per process per file version, ``split_digest``).
    ``mmap=False`` reads the images into memory instead (the pre-mmap path,
    kept for comparisons): both give the same values.
    """
    stats, path, layout = _checked_layout(prepared_dir, split, verify)
    labels = read_labels(path, layout)
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= stats.num_classes):
        raise DataError(f"{path} has labels outside 0..{stats.num_classes - 1}; re-run the prepare stage")
    import torch

    images = map_images(path, layout)
    if not mmap:
        images = np.array(images)
    return Split(images=as_tensor(images), labels=torch.from_numpy(labels))


def load_images_numpy(prepared_dir: str | os.PathLike[str], split: str) -> "np.ndarray":
    """One split's uint8 images (N x C x H x W), memory-mapped and hash-verified, without importing torch.

    The plots stage draws a handful of test images; importing torch for them
    cost it more than all its other reading together.
    """
    _, path, layout = _checked_layout(prepared_dir, split, verify=True)
    return map_images(path, layout)
