"""Read the layout of a class-per-folder image tree (what ``data.source`` points at).

Two layouts, the ones torchvision's ``ImageFolder`` and Keras'
``image_dataset_from_directory`` users already have:

* ``<root>/<class>/**/<image>``: one tree; prepare cuts val and test from it;
* ``<root>/train/<class>/...`` and ``<root>/test/<class>/...`` (optionally
  ``val/``): the given splits are respected.

A single wrapper folder (``my_images.zip`` holding ``my_images/``) is
stepped into. Class names are the folder names in sorted order: stable on
every machine, and the order ``stats.json`` and ``model.json`` record.
Images in sub-folders of a class belong to that class. Hidden files and OS
litter (``.DS_Store``, ``Thumbs.db``, ``__MACOSX/``) are ignored silently;
other non-image files are listed for the report.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cnnpipe.data.images import IMAGE_SUFFIXES
from cnnpipe.util.errors import DataError

SPLIT_DIRS = ("train", "val", "test")
OS_LITTER = frozenset({".ds_store", "thumbs.db", "desktop.ini", "__macosx"})


@dataclass(frozen=True)
class Entry:
    """One image file: where it is, its path in the tree (for messages) and its class index."""

    path: Path
    rel: str
    label: int

    @property
    def order(self) -> tuple[str, int, str]:
        """Files sort by name first: a tree exported with numbered names keeps its original order."""
        return (PurePosixPath(self.rel).name, self.label, self.rel)


@dataclass
class Tree:
    root: Path
    classes: list[str]
    splits: dict[str, list[Entry]]  # "all" for one tree, else the given "train"/"val"/"test"
    non_images: list[str] = field(default_factory=list)  # files with a non-image suffix (tree-relative)
    loose: list[str] = field(default_factory=list)  # files outside any class folder
    empty: list[str] = field(default_factory=list)  # class folders without image files ("test/dog")

    @property
    def given(self) -> bool:
        return "all" not in self.splits

    def entries(self) -> list[Entry]:
        return [entry for split in self.splits.values() for entry in split]


def _litter(name: str) -> bool:
    return name.startswith(".") or name.lower() in OS_LITTER


def _visible(folder: Path) -> tuple[list[Path], list[Path]]:
    """Sorted visible sub-folders and files of ``folder``."""
    try:
        items = sorted(folder.iterdir())
    except PermissionError:
        raise DataError(f"{folder}: permission denied; make it readable") from None
    dirs = [p for p in items if not _litter(p.name) and p.is_dir()]
    files = [p for p in items if not _litter(p.name) and p.is_file()]
    return dirs, files


def find_root(folder: Path) -> Path:
    """Step into a lone wrapper folder (an archive's ``my_images/``) until classes or splits appear."""
    current = folder
    for _ in range(4):
        dirs, files = _visible(current)
        if len(dirs) == 1 and not files:
            current = dirs[0]
            continue
        break
    return current


def _walk_class(class_dir: Path, root: Path, label: int, tree: Tree) -> list[Entry]:
    found: list[Entry] = []
    for here, dirs, files in os.walk(class_dir, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not _litter(d))
        for name in sorted(files):
            if _litter(name):
                continue
            path = Path(here) / name
            rel = path.relative_to(root).as_posix()
            if path.suffix.lower() in IMAGE_SUFFIXES:
                found.append(Entry(path, rel, label))
            else:
                tree.non_images.append(rel)
    return found


def _class_names(split_root: Path) -> list[str]:
    return [d.name for d in _visible(split_root)[0]]


def scan_tree(folder: str | os.PathLike[str]) -> Tree:
    """The classes and image files under ``folder``; refuses a missing or class-less tree."""
    base = Path(folder)
    if not base.is_dir():
        raise DataError(f"{base}: no such folder; point data.source at your class-per-folder images")
    root = find_root(base)
    dirs, files = _visible(root)
    by_name = {d.name.lower(): d for d in dirs}
    tree = Tree(root=root, classes=[], splits={}, loose=[f.relative_to(root).as_posix() for f in files])
    if "train" in by_name and "test" in by_name:
        split_roots = {name: by_name[name] for name in SPLIT_DIRS if name in by_name}
        tree.loose += [d.name + "/" for d in dirs if d.name.lower() not in SPLIT_DIRS]
        train_classes = _class_names(split_roots["train"])
        for name, split_root in split_roots.items():
            extra = sorted(set(_class_names(split_root)) - set(train_classes))
            if extra:
                raise DataError(f"{split_root}: class folder {extra[0]!r} is not in {split_roots['train'].name}/; "
                                "every class needs training images (add them, or remove the folder)")
        tree.classes = sorted(train_classes)
        for name, split_root in split_roots.items():
            entries: list[Entry] = []
            for label, cls in enumerate(tree.classes):
                class_dir = split_root / cls
                if not class_dir.is_dir():
                    tree.empty.append(f"{split_root.name}/{cls}")
                    continue
                found = _walk_class(class_dir, root, label, tree)
                if not found:
                    tree.empty.append(f"{split_root.name}/{cls}")
                entries += found
            tree.splits[name] = sorted(entries, key=lambda e: e.order)
    else:
        tree.classes = sorted(d.name for d in dirs)
        entries = []
        for label, cls in enumerate(tree.classes):
            found = _walk_class(root / cls, root, label, tree)
            if not found:
                tree.empty.append(cls)
            entries += found
        tree.splits["all"] = sorted(entries, key=lambda e: e.order)
    return tree


def tree_digest(folder: str | os.PathLike[str]) -> tuple[str, int]:
    """SHA-256 over every visible file's path and content, and the file count: the data version of a tree."""
    root = Path(folder)
    digest = hashlib.sha256()
    count = 0
    for here, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not _litter(d))
        for name in sorted(files):
            if _litter(name):
                continue
            path = Path(here) / name
            file_hash = hashlib.sha256()
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    file_hash.update(chunk)
            digest.update(f"{path.relative_to(root).as_posix()}\0{file_hash.hexdigest()}\n".encode())
            count += 1
    return digest.hexdigest(), count
