"""The run-state store: per-epoch training state of unfinished runs, so a killed grid resumes.

Entries live at ``<project root>/.cnnpipe-cache/state/<key>/`` (anchored at
``$DVC_ROOT`` like the run cache, so a queued experiment's temp copy finds
them). ``state.safetensors`` is written by the engine after every epoch
(``engine.resume``); ``trial.json`` is the parent's note of the MLflow child
run that logs it, so a resumed run reopens that child instead of starting a
second one. The key hashes the state identity (config, minus ``epochs`` when
no schedule depends on it), the data fingerprint, the training code and the
device: a state is never continued by different code or data.

A run that finishes moves to the run cache and its state is deleted; states
of runs that successive halving pruned stay, so a later search with more
epochs or another eta continues them. ``cnnpipe cache`` lists and prunes.

Two trains of the same trial at once (queued experiments with the same
params, ``-j 2``) would write, resume and delete one folder under each
other. So a search first *claims* each trial's folder (an ``flock`` on
``.locks/<key>``, held until the search ends); a trial another live search
holds trains without run state in this one, and that folder is left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.util.files import atomic_write_json
from cnnpipe.util.locks import try_hold
from cnnpipe.util.hashing import digest
from cnnpipe.store.location import default_cache_dir
from cnnpipe.store.run_cache import code_version

if TYPE_CHECKING:
    from filelock import FileLock

    from cnnpipe.params.run_config import RunConfig

STATE_DIRNAME = "state"
TRIAL_FILE = "trial.json"
LOCKS_DIRNAME = ".locks"


def default_state_dir() -> Path:
    """Beside the run cache's ``runs/`` folder (``CNNPIPE_CACHE_DIR`` moves both)."""
    return default_cache_dir().parent / STATE_DIRNAME


def state_key(cfg: "RunConfig", data_fingerprint: str, device: str, code: str | None = None) -> str:
    from cnnpipe.engine.resume import state_identity
    payload = {"identity": state_identity(cfg), "data": data_fingerprint, "code": code or code_version(),
               "device": device.split(":")[0]}
    return digest(payload)


@dataclass(frozen=True)
class StoredState:
    """What the store knows of one entry, without reading its tensors."""

    path: Path
    bytes: int
    modified: float
    epoch: int | None
    name: str


class RunStateStore:
    """Folders of run state by key; the trial writes the state, the parent the ``trial.json`` note."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_state_dir()
        self._claims: dict[str, FileLock] = {}

    def claim(self, folder: Path) -> bool:
        """Take ``folder`` for this search (False: another live search is training that trial now)."""
        if folder.name in self._claims:
            return True
        try:
            lock = try_hold(self.root / LOCKS_DIRNAME / folder.name)
        except OSError:
            return True  # a read-only store: nothing will be written there anyway
        if lock is None:
            return False
        self._claims[folder.name] = lock
        return True

    def release(self) -> None:
        """Let other searches have the folders again (the lock files stay: unlinking one races a waiter)."""
        for lock in self._claims.values():
            with contextlib.suppress(OSError):
                lock.release()
        self._claims.clear()

    def folder(self, cfg: "RunConfig", fingerprint: str, device: str) -> Path:
        return self.root / state_key(cfg, fingerprint, device)

    @staticmethod
    def saved_epoch(folder: Path) -> int | None:
        """The last epoch saved in ``folder`` (None: nothing usable there)."""
        from cnnpipe.engine.resume import read_state_header

        header = read_state_header(folder)
        return int(header["epoch"]) if header and header.get("epoch") is not None else None

    @staticmethod
    def read_note(folder: Path) -> dict[str, Any]:
        try:
            note = json.loads((folder / TRIAL_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return note if isinstance(note, dict) else {}

    @staticmethod
    def write_note(folder: Path, note: dict[str, Any]) -> None:
        atomic_write_json(folder / TRIAL_FILE, {**note, "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})

    @staticmethod
    def discard(folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def entries(self) -> list[StoredState]:
        out = []
        if not self.root.is_dir():
            return out
        for folder in sorted(self.root.iterdir()):
            if not folder.is_dir() or folder.name.startswith("."):
                continue
            files = [p for p in folder.rglob("*") if p.is_file()]
            size = sum(p.stat().st_size for p in files)
            modified = max((p.stat().st_mtime for p in files), default=folder.stat().st_mtime)
            note = self.read_note(folder)
            out.append(StoredState(folder, size, modified, note.get("epoch"), str(note.get("run_name", "?"))))
        return out
