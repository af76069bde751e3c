"""``prepare`` for class-per-folder images: decode once, split, report honestly, write ``data/prepared``.

The output is the benchmark datasets' prepared format (``write_prepared``),
so train, evaluate, plots, predict and MLflow need nothing new. What a user's
own folder needs on top, in order, before anything is written:

1. refuse what cannot train: fewer than 2 classes, an empty class folder;
2. refuse what would not fit on disk: the uint8 size is estimated *before
   decoding* against the free space beside ``out_dir`` (twice over: the
   decoded images, then the splits);
3. decode every image once (PIL, threads: decoding releases the GIL), each
   file's SHA-256 on the way; an image above ``data.max_pixels`` is refused by
   name; unreadable files are skipped and listed, or refused (``data.strict``);
   each decoded image goes straight to a scratch file on disk, so memory
   stays flat whatever the dataset's size;
4. split: the given ``train/``/``val/``/``test/`` trees, else stratified and
   seeded (``test_fraction``, then ``val_fraction`` of the rest);
5. exact duplicates (same file bytes) across splits are counted and, with
   ``data.dedupe``, dropped from val/test so no test image was trained on;
6. each split file is written a chunk at a time from the scratch file (the
   train split's mean/std counted on the way), then the scratch is deleted.

Nothing here holds more than a chunk of images (``split_file.CHUNK_BYTES``)
at once: training maps the splits (``data.prepared``), so a dataset larger
than RAM prepares and trains; epochs then read from disk, and ``describe``
says so once.

``folder_report.json`` beside the splits keeps the per-class counts and
the skipped files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.data.folder import Entry, Tree, scan_tree
from cnnpipe.data.images import ImageProblem, ImageTooLarge, to_array
from cnnpipe.data.prepare import stratified_split
from cnnpipe.data.prepared import FORMAT, SPLITS, ChannelHistogram, PreparedStats, finish_prepared
from cnnpipe.data.split_file import SplitWriter, chunk_rows, map_images, read_layout
from cnnpipe.util.errors import DataError
from cnnpipe.util.files import atomic_dir, atomic_write_json

REPORT_FILE = "folder_report.json"
SHOWN = 3  # file names quoted in one-line messages
DISK_MARGIN = 64 * 1024**2  # free space kept beyond the estimate
DECODE_BATCH = 512  # images submitted to the decoding threads at a time (bounded memory)


def available_memory() -> int:
    """Memory the OS could give a process now (``MemAvailable``), else physical memory."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def _shown(items: list[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    text = ", ".join(items[:SHOWN])
    return text + (f" and {total - SHOWN} more" if total > SHOWN else "")


def check_disk(count: int, shape: tuple[int, int, int], where: Path, free: int | None = None) -> int:
    """The uint8 bytes of ``count`` images; refuse with the fix when twice that is not free at ``where``.

    Twice: the decoded images go to a scratch file, then into the split
    files, and the scratch is deleted only after. ``free`` overrides the
    measured free space (tests).
    """
    channels, height, width = shape
    need = count * channels * height * width
    if free is None:
        probe = where
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
    if 2 * need + DISK_MARGIN > free:
        per_image = max(free - DISK_MARGIN, 0) / 2 / max(count, 1) / channels
        side = max(int(per_image**0.5) // 8 * 8, 8)
        raise DataError(
            f"{count:,} images at {channels}x{height}x{width} need ~{2 * need / 1e9:.1f} GB of free disk beside "
            f"{where} (decoded once to a scratch file, then written as splits), but {free / 1e9:.1f} GB is free; "
            f"free some space, or set a smaller data.image_size, e.g. [{side}, {side}]"
        )
    return need


@dataclass
class ClassCount:
    found: int = 0
    kept: int = 0
    skipped: int = 0
    splits: dict[str, int] = field(default_factory=lambda: {"train": 0, "val": 0, "test": 0})


@dataclass
class FolderReport:
    classes: list[str]
    per_class: dict[str, ClassCount]
    skipped: list[tuple[str, str]]  # (file, reason)
    non_images: list[str]
    duplicates: dict[str, int]  # "val"/"test" -> images whose bytes are also in an earlier split
    dropped: dict[str, int]
    conflicts: int  # identical bytes under two different classes
    notes: list[str]

    def as_json(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "per_class": {name: {"found": c.found, "kept": c.kept, "skipped": c.skipped, **c.splits}
                          for name, c in self.per_class.items()},
            "skipped": [{"file": f, "reason": r} for f, r in self.skipped],
            "non_images": self.non_images,
            "duplicates": self.duplicates,
            "dropped": self.dropped,
            "label_conflicts": self.conflicts,
            "notes": self.notes,
        }

    def table(self) -> str:
        width = max(len("class"), *(len(n) for n in self.classes))
        head = f"  {'class':<{width}}  found  kept  skipped  train    val   test"
        rows = [head]
        for name in self.classes:
            c = self.per_class[name]
            rows.append(f"  {name:<{width}}  {c.found:5d}  {c.kept:4d}  {c.skipped:7d}  {c.splits['train']:5d}  "
                        f"{c.splits['val']:5d}  {c.splits['test']:5d}")
        return "\n".join(rows)


@dataclass(frozen=True)
class FolderPrepareResult:
    stats: PreparedStats
    report: FolderReport
    seconds: float
    train_bytes: int = 0  # the train split's images on disk
    memory: int = 0  # memory available when it was written (``available_memory``)


def _check_tree(tree: Tree, strict: bool) -> None:
    if len(tree.classes) < 2:
        found = f"1 class folder ({tree.classes[0]})" if tree.classes else "no class folders"
        raise DataError(f"{tree.root}: found {found}; a classifier needs at least 2: put each class's images in its own "
                        "sub-folder (my_images/cat/*.jpg, my_images/dog/*.jpg)")
    empty = [name for name in tree.empty if not name.startswith(("val/", "test/"))]
    if empty:
        raise DataError(f"{tree.root}: class folder {empty[0]!r} has no images ({', '.join(sorted(IMAGE_HINT))}); "
                        "add some or remove the folder")
    if strict and (tree.non_images or tree.loose):
        files = tree.non_images + tree.loose
        raise DataError(f"{tree.root}: {len(files)} non-image file(s) ({_shown(files)}); remove them, "
                        "or set data.strict: false to skip them")


IMAGE_HINT = ("png", "jpg", "jpeg", "bmp", "gif", "webp", "tif")


def _decode_all(entries: list[Entry], shape: tuple[int, int, int], max_pixels: int, workers: int,
                progress: bool, scratch: int) -> tuple[list[str], list[str | None]]:
    """Decode every entry into row ``index`` of the ``scratch`` file; per entry its SHA-256 and a skip reason (or None).

    Each thread writes its image with ``os.pwrite`` (no shared array, no
    lock), and images are submitted ``DECODE_BATCH`` at a time, so memory
    holds a few images per thread whatever the count. Skipped rows stay
    zero (a hole in the sparse file) and are never read.
    """
    channels, height, width = shape
    row = channels * height * width
    os.ftruncate(scratch, len(entries) * row)
    hashes: list[str] = [""] * len(entries)
    reasons: list[str | None] = [None] * len(entries)

    def work(index: int) -> None:
        entry = entries[index]
        try:
            data = entry.path.read_bytes()
        except OSError as err:
            reasons[index] = f"unreadable ({err.strerror or type(err).__name__})"
            return
        hashes[index] = hashlib.sha256(data).hexdigest()
        try:
            image = to_array(data, channels, (height, width), max_pixels=max_pixels)[0]
        except ImageTooLarge as err:
            raise DataError(f"{entry.rel}: {err.reason}; refusing it (a decompression bomb?): remove it, "
                            "or raise data.max_pixels if it is a genuine large image") from None
        except ImageProblem as err:
            reasons[index] = err.reason
            return
        os.pwrite(scratch, np.ascontiguousarray(image, dtype=np.uint8).tobytes(), index * row)

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(entries), desc="decoding", unit="img", leave=False, file=sys.stderr,
        disable=None if progress else True, dynamic_ncols=True,
    ) as bar:
        for first in range(0, len(entries), DECODE_BATCH):
            for _ in pool.map(work, range(first, min(first + DECODE_BATCH, len(entries)))):
                bar.update(1)
    return hashes, reasons


def _write_splits(out: Path, scratch: int, order: dict[str, np.ndarray], labels: np.ndarray,
                  shape: tuple[int, int, int]) -> tuple[dict[str, str], dict[str, int], tuple[list[float], list[float]]]:
    """Each split file, gathered a chunk at a time from the scratch rows; its SHA-256; the train mean/std."""
    row = int(np.prod(shape))
    step = chunk_rows(shape)
    files: dict[str, str] = {}
    sizes: dict[str, int] = {}
    histogram = ChannelHistogram(shape[0])
    for name in SPLITS:
        idx = order[name]
        with SplitWriter(out / f"{name}.safetensors", labels[idx], shape, {"format": FORMAT}) as writer:
            for first in range(0, idx.size, step):
                rows = idx[first:first + step]
                chunk = np.empty((rows.size, *shape), dtype=np.uint8)
                flat = chunk.reshape(rows.size, row)
                for j, i in enumerate(rows):
                    if os.preadv(scratch, [flat[j]], int(i) * row) != row:
                        raise DataError("the scratch file of decoded images ended early (disk full?); re-run prepare")
                if name == "train":
                    histogram.add(chunk)
                writer.write(chunk)
            files[f"{name}.safetensors"] = writer.close()
        sizes[name] = int(idx.size)
    return files, sizes, histogram.result()


def _split_indices(labels: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    if round(labels.size * fraction) < 1:
        raise DataError(f"data.{what}={fraction} of {labels.size} images leaves no {what.split('_')[0]} images; raise it or add images")
    return stratified_split(labels, fraction, seed)


def prepare_folder(
    source: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    image_size: tuple[int, int] | list[int],
    channels: int,
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    strict: bool = False,
    max_pixels: int = 50_000_000,
    dedupe: bool = True,
    samples_path: str | os.PathLike[str] | None = None,
    disk_free: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    source_digest: str = "",
) -> FolderPrepareResult:
    """Class-per-folder images at ``source`` -> ``out_dir`` (swapped in whole) and the sample grid.

    ``disk_free`` overrides the measured free disk space (tests of the refusal).
    """
    start = time.perf_counter()
    height, width = (int(d) for d in image_size)
    shape = (int(channels), height, width)
    tree = scan_tree(source)
    _check_tree(tree, strict)
    entries = tree.entries()
    out = Path(out_dir)
    check_disk(len(entries), shape, out.parent, disk_free)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The scratch file lives beside out_dir (the disk just checked; never /tmp, often RAM) and is unlinked at once:
    # the open descriptor keeps it until the end, and even a killed prepare leaves nothing behind.
    with tempfile.TemporaryFile(dir=out.parent, prefix=".prepare-decoded-") as handle:
        return _prepare(tree, entries, shape, out, handle.fileno(), source=source, val_fraction=val_fraction,
                        test_fraction=test_fraction, split_seed=split_seed, strict=strict, max_pixels=max_pixels,
                        dedupe=dedupe, samples_path=samples_path, workers=workers or min(8, os.cpu_count() or 1),
                        progress=progress, source_digest=source_digest, start=start)


def _prepare(tree: Tree, entries: list[Entry], shape: tuple[int, int, int], out: Path, scratch: int, *,
             source: str | os.PathLike[str], val_fraction: float, test_fraction: float, split_seed: int, strict: bool,
             max_pixels: int, dedupe: bool, samples_path: str | os.PathLike[str] | None, workers: int,
             progress: bool, source_digest: str, start: float) -> FolderPrepareResult:
    """``prepare_folder`` once the tree is checked and the ``scratch`` file is open."""
    hashes, reasons = _decode_all(entries, shape, max_pixels, workers, progress, scratch)
    skipped = sorted((entries[i].rel, r) for i, r in enumerate(reasons) if r is not None)
    if skipped and strict:
        shown = _shown([f"{f}: {r}" for f, r in skipped])
        raise DataError(f"{tree.root}: {len(skipped)} unreadable image file(s) ({shown}); fix or remove them, "
                        "or set data.strict: false to skip them")
    ok = np.array([r is None for r in reasons], dtype=bool)
    labels = np.array([e.label for e in entries], dtype=np.int64)
    per_class = {name: ClassCount() for name in tree.classes}
    for entry, good in zip(entries, ok):
        count = per_class[tree.classes[entry.label]]
        count.found += 1
        count.kept += int(good)
        count.skipped += int(not good)
    dead = [name for name, c in per_class.items() if c.kept == 0]
    if dead:
        raise DataError(f"{tree.root}: class {dead[0]!r} has no readable images ({per_class[dead[0]].skipped} skipped); "
                        "add readable images or remove the folder")

    # Positions (into entries) of each split, kept images only, in file order.
    offsets, position = {}, 0
    for name, split in tree.splits.items():
        offsets[name] = np.arange(position, position + len(split))
        position += len(split)
    kept = {name: idx[ok[idx]] for name, idx in offsets.items()}
    notes: list[str] = []
    if tree.given:
        train_pool = kept["train"]
        test = kept["test"]
        if "val" in kept and kept["val"].size:
            train, val = train_pool, kept["val"]
        else:
            t, v = _split_indices(labels[train_pool], val_fraction, split_seed, "val_fraction")
            train, val = train_pool[t], train_pool[v]
    else:
        pool = kept["all"]
        rest, t = _split_indices(labels[pool], test_fraction, split_seed, "test_fraction")
        test, rest = pool[t], pool[rest]
        t, v = _split_indices(labels[rest], val_fraction, split_seed, "val_fraction")
        train, val = rest[t], rest[v]
    order = {"train": train, "val": val, "test": test}

    # Exact duplicates: val against train, test against train + val.
    seen: dict[str, int] = {}
    for i in train:
        seen.setdefault(hashes[i], int(labels[i]))
    duplicates, dropped = {"val": 0, "test": 0}, {"val": 0, "test": 0}
    conflicts = 0
    for name in ("val", "test"):
        keep = []
        for i in order[name]:
            h = hashes[i]
            if h in seen:
                duplicates[name] += 1
                conflicts += int(seen[h] != labels[i])
                if dedupe:
                    dropped[name] += 1
                    continue
            keep.append(i)
        order[name] = np.array(keep, dtype=np.int64)
        for i in order[name]:
            seen.setdefault(hashes[i], int(labels[i]))
        if order[name].size == 0:
            raise DataError(f"{tree.root}: no {name} images left (after dropping {dropped[name]} duplicates of training "
                            f"images); add more images or lower data.{'val' if name == 'val' else 'test'}_fraction")
    for name, idx in order.items():
        for c, n in zip(*np.unique(labels[idx], return_counts=True)):
            per_class[tree.classes[int(c)]].splits[name] = int(n)
    for name, c in per_class.items():
        if c.splits["val"] == 0 or c.splits["test"] == 0:
            missing = " and ".join(s for s in ("val", "test") if c.splits[s] == 0)
            notes.append(f"class {name!r} has {c.kept} usable image(s): none in {missing}")
    if tree.non_images or tree.loose:
        files = tree.non_images + tree.loose
        notes.append(f"ignored {len(files)} non-image file(s): {_shown(files)}")
    for name in tree.empty:
        if name.startswith(("val/", "test/")):
            notes.append(f"{name} has no images")

    report = FolderReport(tree.classes, per_class, skipped, tree.non_images + tree.loose, duplicates, dropped,
                          conflicts, notes)
    with atomic_dir(out) as tmp:
        files, sizes, (mean, std) = _write_splits(tmp, scratch, order, labels, shape)
        os.ftruncate(scratch, 0)  # the decoded copy is no longer needed: give its disk space back now
        stats = finish_prepared(tmp, dataset="folder", classes=tree.classes, image_shape=shape, mean=mean, std=std,
                                sizes=sizes, files=files, split_seed=split_seed, val_fraction=val_fraction,
                                sources={str(source): source_digest} if source_digest else {})
        atomic_write_json(Path(tmp) / REPORT_FILE, report.as_json())
        if samples_path is not None:
            from cnnpipe.data.samples import save_sample_grid

            train_file = tmp / "train.safetensors"
            save_sample_grid(samples_path, map_images(train_file, read_layout(train_file)), labels[order["train"]],
                             tree.classes, seed=split_seed,
                             title=f"{Path(source).name}: random training images, one row per class")
    train_bytes = int(order["train"].size) * int(np.prod(shape))
    return FolderPrepareResult(stats, report, time.perf_counter() - start, train_bytes, available_memory())


def describe(result: FolderPrepareResult, source: str, dedupe: bool) -> list[str]:
    """The prepare stage's report lines."""
    report = result.report
    found = sum(c.found for c in report.per_class.values())
    kept = sum(c.kept for c in report.per_class.values())
    lines = [f"prepare: {source}: {len(report.classes)} classes, {found:,} images found, {kept:,} kept"]
    if report.skipped:
        shown = _shown([f"{f} ({r})" for f, r in report.skipped])
        lines.append(f"prepare: skipped {len(report.skipped)} unreadable image(s): {shown} (data.strict: true refuses them)")
    lines.append(report.table())
    total = sum(report.duplicates.values())
    if total:
        counts = ", ".join(f"{n} in {s}" for s, n in report.duplicates.items() if n)
        action = "dropped from val/test (data.dedupe: true)" if dedupe else "KEPT (data.dedupe: false): test scores may be optimistic"
        lines.append(f"prepare: {total} exact duplicate(s) of earlier-split images ({counts}): {action}")
    if report.conflicts:
        lines.append(f"prepare: {report.conflicts} of them are the same file under two different classes: check the labels")
    lines += [f"prepare: note: {note}" for note in report.notes]
    if result.train_bytes > result.memory > 0:
        lines.append(f"prepare: note: the train split ({result.train_bytes / 1e9:.1f} GB) is larger than the memory "
                     f"available now ({result.memory / 1e9:.1f} GB): training maps it, so epochs will read it from "
                     "disk (slower than from memory)")
    return lines

