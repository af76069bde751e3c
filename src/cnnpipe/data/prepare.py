"""Decode the raw files, hold out a stratified validation split, write ``data/prepared``.

The validation split is cut from the *training* files (the test set is never
touched until evaluation), per class, with exact counts and a seed of its
own (``data.split_seed``), so every grid run and every re-run compares on the
same images. Mean/std come from the train split only (``write_prepared``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnpipe.data.formats import load_idx, read_cifar_archive
from cnnpipe.data.prepared import PreparedStats, write_prepared
from cnnpipe.data.registry import DatasetSpec
from cnnpipe.util.errors import DataError
from cnnpipe.util.files import atomic_dir


@dataclass(frozen=True)
class RawData:
    """The decoded upstream train/test sets, before the validation split."""

    train_images: np.ndarray  # uint8 N x C x H x W
    train_labels: np.ndarray  # int64 N
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]
    sources: dict[str, str]  # raw file name -> content SHA-256


def _check(spec: DatasetSpec, where: str, images: np.ndarray, labels: np.ndarray) -> None:
    if images.dtype != np.uint8:
        raise DataError(f"{where}: images are {images.dtype}, expected uint8; re-download {spec.name}")
    if tuple(images.shape[1:]) != tuple(spec.image_shape):
        shape = " x ".join(map(str, spec.image_shape))
        raise DataError(f"{where}: images are {' x '.join(map(str, images.shape[1:]))}, {spec.name} has {shape}; is data.dataset right?")
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{where}: {images.shape[0]} images but {labels.shape[0]} labels; re-download {spec.name}")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(f"{where}: labels outside 0..{spec.num_classes - 1}; is data.dataset right?")


def _load_idx_set(spec: DatasetSpec, raw_dir: Path, prefix: str, sources: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    image_file, label_file = spec.file(f"{prefix}_images"), spec.file(f"{prefix}_labels")
    images, sources[image_file.name] = load_idx(raw_dir / image_file.name)
    labels, sources[label_file.name] = load_idx(raw_dir / label_file.name)
    if images.ndim != 3 or labels.ndim != 1:
        raise DataError(f"{raw_dir / image_file.name}: expected N x H x W images and N labels; re-download {spec.name}")
    images = images[:, None, :, :]
    labels = labels.astype(np.int64)
    _check(spec, f"{raw_dir / image_file.name}", images, labels)
    return images, labels


def load_raw(spec: DatasetSpec, raw_dir: str | os.PathLike[str]) -> RawData:
    """Decode ``raw_dir`` (what the download stage wrote) for ``spec``."""
    folder = Path(raw_dir)
    missing = [raw.name for raw in spec.files if not (folder / raw.name).is_file()]
    if missing:
        raise DataError(f"{folder / missing[0]} is missing; run the download stage first (dvc repro download)")
    sources: dict[str, str] = {}
    if spec.format == "idx-gz":
        train = _load_idx_set(spec, folder, "train", sources)
        test = _load_idx_set(spec, folder, "test", sources)
        classes = list(spec.classes)
    elif spec.format == "cifar-python":
        archive = spec.files[0].name
        data = read_cifar_archive(folder / archive)
        sources[archive] = data.content_sha256
        train = (data.train_images, data.train_labels)
        test = (data.test_images, data.test_labels)
        _check(spec, f"{folder / archive} (train batches)", *train)
        _check(spec, f"{folder / archive} (test batch)", *test)
        names = data.label_names
        classes = names if names and len(names) == spec.num_classes else list(spec.classes)
    else:
        raise DataError(f"{spec.name}: unknown raw format {spec.format!r}")
    return RawData(train[0], train[1], test[0], test[1], classes, sources)


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, val) indices: each class gives ``val_fraction`` of its images to val.

    Per-class counts are floor(n_c * f) plus one for the classes with the
    largest remainders until the total is round(N * f) (largest-remainder
    rounding), so 60,000 balanced Fashion-MNIST images give exactly 6,000. A
    class never gives away its last training image.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * val_fraction
    take = np.floor(quota).astype(np.int64)
    short = int(round(labels.size * val_fraction)) - int(take.sum())
    order = np.lexsort((classes, -(quota - take)))  # largest remainder first, ties by class
    for index in order[: max(short, 0)]:
        take[index] += 1
    take = np.minimum(take, np.maximum(counts - 1, 0))
    if take.sum() == 0:
        raise DataError(f"data.val_fraction={val_fraction} leaves no validation images out of {labels.size}; raise it")
    rng = np.random.default_rng(seed)
    val_parts = []
    for cls, n in zip(classes, take):
        members = np.flatnonzero(labels == cls)
        val_parts.append(rng.permutation(members)[:n])
    val = np.sort(np.concatenate(val_parts))
    train_mask = np.ones(labels.size, dtype=bool)
    train_mask[val] = False
    return np.flatnonzero(train_mask), val


@dataclass(frozen=True)
class PrepareResult:
    stats: PreparedStats
    seconds: float


def prepare_dataset(
    spec: DatasetSpec,
    raw_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    val_fraction: float,
    split_seed: int,
    samples_path: str | os.PathLike[str] | None = None,
) -> PrepareResult:
    """Raw files -> ``out_dir`` (swapped in whole) and, optionally, the sample grid."""
    start = time.perf_counter()
    raw = load_raw(spec, raw_dir)
    train_idx, val_idx = stratified_split(raw.train_labels, val_fraction, split_seed)
    splits = {
        "train": (raw.train_images[train_idx], raw.train_labels[train_idx]),
        "val": (raw.train_images[val_idx], raw.train_labels[val_idx]),
        "test": (raw.test_images, raw.test_labels),
    }
    with atomic_dir(out_dir) as tmp:
        stats = write_prepared(
            tmp, splits, dataset=spec.name, classes=raw.classes, split_seed=split_seed,
            val_fraction=val_fraction, sources=raw.sources,
        )
    if samples_path is not None:
        from cnnpipe.data.samples import save_sample_grid

        images, labels = splits["train"]
        save_sample_grid(
            samples_path, images, labels, raw.classes, seed=split_seed,
            title=f"{spec.name}: random training images, one row per class",
        )
    return PrepareResult(stats, time.perf_counter() - start)
