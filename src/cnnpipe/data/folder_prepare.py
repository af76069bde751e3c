"""``prepare`` for class-per-folder images: decode once, split, report honestly, write ``data/prepared``.

The output is the benchmark datasets' prepared format (``write_prepared``),
so train, evaluate, plots, predict and MLflow need nothing new. What a user's
own folder needs on top, in order, before anything is written:

1. refuse what cannot train: fewer than 2 classes, an empty class folder;
2. refuse what would not fit: the engine holds whole splits in memory, so
   the uint8 size is estimated *before decoding* against a quarter of RAM;
3. decode every image once (PIL, threads: decoding releases the GIL), each
   file's SHA-256 on the way; an image above ``data.max_pixels`` is refused by
   name; unreadable files are skipped and listed, or refused (``data.strict``);
4. split: the given ``train/``/``val/``/``test/`` trees, else stratified and
   seeded (``test_fraction``, then ``val_fraction`` of the rest);
5. exact duplicates (same file bytes) across splits are counted and, with
   ``data.dedupe``, dropped from val/test so no test image was trained on.

``folder_report.json`` beside the splits keeps the per-class counts and
the skipped files.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cnnpipe.data.folder import Entry, Tree, scan_tree
from cnnpipe.data.images import ImageProblem, ImageTooLarge, to_array
from cnnpipe.data.prepare import stratified_split
from cnnpipe.data.prepared import PreparedStats, write_prepared
from cnnpipe.util.errors import DataError
from cnnpipe.util.files import atomic_dir, atomic_write_json

REPORT_FILE = "folder_report.json"
SHOWN = 3  # file names quoted in one-line messages
MEMORY_SHARE = 4  # whole splits may take at most 1/MEMORY_SHARE of physical memory


def physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def _shown(items: list[str], total: int | None = None) -> str:
    total = len(items) if total is None else total
    text = ", ".join(items[:SHOWN])
    return text + (f" and {total - SHOWN} more" if total > SHOWN else "")


def check_memory(count: int, shape: tuple[int, int, int], budget: int) -> int:
    """The uint8 bytes of ``count`` images; refuse with the fix when above ``budget``."""
    channels, height, width = shape
    need = count * channels * height * width
    if need > budget:
        per_image = budget / max(count, 1) / channels
        side = max(int(per_image**0.5) // 8 * 8, 8)
        raise DataError(
            f"{count:,} images at {channels}x{height}x{width} need ~{need / 1e9:.1f} GB in memory (training holds whole "
            f"splits), more than the {budget / 1e9:.1f} GB budget (1/{MEMORY_SHARE} of this machine's memory); "
            f"set a smaller data.image_size, e.g. [{side}, {side}]"
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


def _check_tree(tree: Tree, strict: bool, top_k: int) -> None:
    if len(tree.classes) < 2:
        found = f"1 class folder ({tree.classes[0]})" if tree.classes else "no class folders"
        raise DataError(f"{tree.root}: found {found}; a classifier needs at least 2: put each class's images in its own "
                        "sub-folder (my_images/cat/*.jpg, my_images/dog/*.jpg)")
    empty = [name for name in tree.empty if not name.startswith(("val/", "test/"))]
    if empty:
        raise DataError(f"{tree.root}: class folder {empty[0]!r} has no images ({', '.join(sorted(IMAGE_HINT))}); "
                        "add some or remove the folder")
    if top_k > len(tree.classes):
        ks = sorted({1, len(tree.classes)})
        raise DataError(f"eval.top_k asks for top-{top_k} but {tree.root} has {len(tree.classes)} classes; "
                        f"set eval.top_k: {ks}")
    if strict and (tree.non_images or tree.loose):
        files = tree.non_images + tree.loose
        raise DataError(f"{tree.root}: {len(files)} non-image file(s) ({_shown(files)}); remove them, "
                        "or set data.strict: false to skip them")


IMAGE_HINT = ("png", "jpg", "jpeg", "bmp", "gif", "webp", "tif")


def _decode_all(entries: list[Entry], shape: tuple[int, int, int], max_pixels: int,
                workers: int, progress: bool) -> tuple[np.ndarray, list[str], list[str | None]]:
    """Decode every entry into one preallocated array; per entry its SHA-256 and a skip reason (or None)."""
    channels, height, width = shape
    images = np.zeros((len(entries), channels, height, width), dtype=np.uint8)
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
            images[index] = to_array(data, channels, (height, width), max_pixels=max_pixels)[0]
        except ImageTooLarge as err:
            raise DataError(f"{entry.rel}: {err.reason}; refusing it (a decompression bomb?): remove it, "
                            "or raise data.max_pixels if it is a genuine large image") from None
        except ImageProblem as err:
            reasons[index] = err.reason

    from tqdm import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(entries), desc="decoding", unit="img", leave=False, file=sys.stderr,
        disable=None if progress else True, dynamic_ncols=True,
    ) as bar:
        for _ in pool.map(work, range(len(entries))):
            bar.update(1)
    return images, hashes, reasons


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
    memory_budget: int | None = None,
    workers: int | None = None,
    progress: bool = False,
    source_digest: str = "",
    top_k: int = 1,
) -> FolderPrepareResult:
    """Class-per-folder images at ``source`` -> ``out_dir`` (swapped in whole) and the sample grid."""
    start = time.perf_counter()
    height, width = (int(d) for d in image_size)
    shape = (int(channels), height, width)
    tree = scan_tree(source)
    _check_tree(tree, strict, top_k)
    entries = tree.entries()
    check_memory(len(entries), shape, memory_budget or physical_memory() // MEMORY_SHARE)

    images, hashes, reasons = _decode_all(entries, shape, max_pixels, workers or min(8, os.cpu_count() or 1), progress)
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
    splits = {name: (images[idx], labels[idx]) for name, idx in order.items()}
    with atomic_dir(out_dir) as tmp:
        stats = write_prepared(tmp, splits, dataset="folder", classes=tree.classes, split_seed=split_seed,
                               val_fraction=val_fraction, sources={str(source): source_digest} if source_digest else {})
        atomic_write_json(Path(tmp) / REPORT_FILE, report.as_json())
    if samples_path is not None:
        from cnnpipe.data.samples import save_sample_grid

        save_sample_grid(samples_path, *splits["train"], tree.classes, seed=split_seed,
                         title=f"{Path(source).name}: random training images, one row per class")
    return FolderPrepareResult(stats, report, time.perf_counter() - start)


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
    return lines

