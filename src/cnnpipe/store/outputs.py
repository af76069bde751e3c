"""Stage outputs reused by what decides them: evaluate's reports, plots' figures.

Scoring a checkpoint and drawing a figure are pure: the same weights, data,
settings and code give the same bytes. A ``dvc exp run`` whose runs all come
from the run cache still re-runs ``evaluate`` and ``plots`` (their MLflow runs
are new), and re-scoring 30k images and re-drawing six figures was most of
its time. Each such output is stored under a key over everything that
decides it, and copied back instead of recomputed.

Entries live at ``<cache>/<kind>/<key>/`` beside the run cache's ``runs/``
(``CNNPIPE_CACHE_DIR`` moves them all); each is written as a whole folder
(temp, then rename), so a killed stage never leaves half an entry, and one
with a file missing is ignored. ``CNNPIPE_NO_CACHE=1`` recomputes every
output (and stores the fresh one), like it retrains every run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from cnnpipe.util.files import atomic_dir, atomic_path


class OutputCache:
    """Get and put whole sets of output files by key."""

    def __init__(self, kind: str, root: str | os.PathLike[str] | None = None) -> None:
        if root is None:
            from cnnpipe.store.location import default_cache_dir

            root = default_cache_dir().parent
        self.root = Path(root) / kind
        self.hits = 0  # entries found by get (a stage reports how much it reused)

    def get(self, key: str, names: Iterable[str]) -> Path | None:
        """The entry's folder when it holds every one of ``names``; None otherwise (and under CNNPIPE_NO_CACHE)."""
        from cnnpipe.store.location import env_no_cache

        folder = self.root / key
        if env_no_cache() or not all((folder / name).is_file() for name in names):
            return None
        self.hits += 1
        with contextlib.suppress(OSError):
            os.utime(folder)  # last use: `cnnpipe cache --older-than` prunes the unused ones first
        return folder

    def put(self, key: str, files: Mapping[str, Path]) -> Path | None:
        """Copy ``files`` (entry name -> source path) into the entry, replacing it whole.

        A failure (a full disk) costs the next run a recomputation, never this
        stage its outputs: it is reported in one line and None is returned.
        """
        folder = self.root / key
        try:
            with atomic_dir(folder) as tmp:
                for name, source in files.items():
                    shutil.copyfile(source, tmp / name)
        except OSError as err:
            print(f"cache: could not store {folder} ({err.strerror or err}); it will be computed again next time",
                  file=sys.stderr, flush=True)
            return None
        return folder

    @staticmethod
    def restore(source: Path, target: Path) -> Path:
        """Copy a stored file to ``target`` atomically (a reader never sees half of it)."""
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)
        return target
