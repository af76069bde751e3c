"""The code-keyed stores: results reused by what decides them (the run cache, evaluate's reports, plots' figures).

Training a run, scoring a checkpoint and drawing a figure are pure: the same
inputs and the same code give the same bytes. A ``dvc exp run`` whose runs
all come from the run cache still re-runs ``evaluate`` and ``plots`` (their
MLflow runs are new), and re-scoring 30k images and re-drawing six figures
was most of its time. Each result is stored under a key over everything that
decides it, and copied back instead of recomputed.

``OutputCache`` is the one API every such store goes through, so the rules
below hold for all of them alike:

- naming (``key``): a digest of the caller's inputs plus the code that
  computes them, ``code_identity(code_entry)`` (every module the store's
  ``CODE_ENTRY`` may import, ``codegraph.code_identity``) and the installed
  version of each third-party library that computes (torch, matplotlib);
- finding (``get``): an entry counts only when it holds every expected file;
  ``CNNPIPE_NO_CACHE=1`` makes every lookup a miss (the fresh result is still
  stored, so a suspect entry is replaced rather than kept);
- writing (``writing``, ``put``): an entry is written as a whole folder
  (temp, then rename), so a killed stage never leaves half an entry.

Entries live at ``<cache>/<kind>/<key>/``: ``runs/`` is ``.cnnpipe-cache/runs``
(``CNNPIPE_CACHE_DIR`` names it) and every other kind sits beside it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from cnnpipe.codegraph import code_identity as ci
from cnnpipe.store.location import default_cache_dir, env_no_cache
from cnnpipe.util.files import atomic_dir, atomic_path
from cnnpipe.util.hashing import digest

RUNS_KIND = "runs"  # the run cache: CNNPIPE_CACHE_DIR itself, the other kinds beside it


@functools.lru_cache(maxsize=None)
def code_version(entries: tuple[str, ...], libraries: tuple[str, ...] = ()) -> str:
    """``code_identity(*entries)`` plus ``/<library>-<version>`` for each library (once per process, not per key).

    Versions come from the installed metadata: naming a key never imports
    torch or matplotlib.
    """
    from importlib.metadata import version

    return "/".join([ci.code_identity(*entries), *(f"{name}-{version(name)}" for name in libraries)])


class OutputCache:
    """One code-keyed store: entries named by inputs and code, found by key, written whole.

    ``kind`` is the store's folder beside the run cache (``root`` moves the
    folder that holds every kind; ``folder`` names this store's own folder,
    as the run cache's ``RunCache(root)`` does). ``code_entry`` is the
    store's ``CODE_ENTRY``; a store opened only to list or prune its entries
    (``store.inventory``) needs none.
    """

    def __init__(self, kind: str, root: str | os.PathLike[str] | None = None, *, code_entry: str | None = None,
                 libraries: Sequence[str] = (), folder: str | os.PathLike[str] | None = None) -> None:
        self.kind = kind
        self.code_entry = code_entry
        self.libraries = tuple(libraries)
        self._root = root
        self._folder = folder
        self.hits = 0  # entries found by get (a stage reports how much it reused)

    @functools.cached_property
    def root(self) -> Path:
        """The folder holding this store's entries (resolved on first use: naming a key never needs it)."""
        if self._folder is not None:
            return Path(self._folder)
        if self._root is not None:
            return Path(self._root) / self.kind
        runs = default_cache_dir()
        return runs if self.kind == RUNS_KIND else runs.parent / self.kind

    # ------------------------------------------------------------------ naming

    def code(self, *modules: str) -> str:
        """The code part of a key: ``code_entry``'s import closure (and ``modules``'), plus the libraries' versions."""
        if self.code_entry is None:
            raise ValueError(f"the {self.kind} store was opened without a code entry: it cannot name entries")
        return code_version((self.code_entry, *modules), self.libraries)

    def key(self, inputs: Mapping[str, Any], *, code: str | None = None) -> str:
        """The entry name for ``inputs`` (JSON-able) computed by ``code`` (default: ``self.code()``)."""
        if "code" in inputs:
            raise ValueError("'code' is the store's part of a key, not an input")
        return digest({**inputs, "code": code if code is not None else self.code()})

    # ------------------------------------------------------------------ finding

    @property
    def reusing(self) -> bool:
        """False under ``CNNPIPE_NO_CACHE``: every lookup misses, every fresh result is still stored."""
        return not env_no_cache()

    def get(self, key: str, names: Iterable[str]) -> Path | None:
        """The entry's folder when it holds every one of ``names``; None otherwise (and under CNNPIPE_NO_CACHE)."""
        folder = self.root / key
        if not self.reusing or not all((folder / name).is_file() for name in names):
            return None
        self.hits += 1
        with contextlib.suppress(OSError):
            os.utime(folder)  # last use: `cnnpipe cache --older-than` prunes the unused ones first
        return folder

    @staticmethod
    def restore(source: Path, target: Path) -> Path:
        """Copy a stored file to ``target`` atomically (a reader never sees half of it)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        return target

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def writing(self, key: str) -> Iterator[Path]:
        """An empty folder to fill; on success it replaces the entry ``key`` whole (errors propagate)."""
        with atomic_dir(self.root / key) as tmp:
            yield tmp

    def put(self, key: str, files: Mapping[str, Path]) -> Path | None:
        """Copy ``files`` (entry name -> source path) into the entry, replacing it whole.

        For outputs the stage has already written: a failure (a full disk)
        costs the next run a recomputation, never this stage its outputs, so
        it is reported in one line and None is returned.
        """
        folder = self.root / key
        try:
            with self.writing(key) as tmp:
                for name, source in files.items():
                    shutil.copyfile(source, tmp / name)
        except OSError as err:
            print(f"cache: could not store {folder} ({err.strerror or err}); it will be computed again next time",
                  file=sys.stderr, flush=True)
            return None
        return folder
