"""Where a worker gets the data its trials train on: a ``DataSource``, not a pickle of the tensors.

``PreparedSource`` maps the prepared folder (memory-mapped safetensors: the
workers of one machine share one copy in the page cache, none holds a
private one) once per worker process, trusting the content hashes the parent
already computed for the same files (same inode, size and mtime).
``RaySource`` falls back to a copy in Ray's object store when the folder does
not exist on that node (a cluster). ``InlineSource`` pickles the data itself,
for a ``TrainData`` that has no folder. Each backend picks its source
(``Executor.data_source``); the trial calls ``load()`` in the worker.

Nothing here imports torch or ray at module level.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cnnpipe.data.prepared import load_stats, trust_digests
from cnnpipe.engine.data import TrainData
from cnnpipe.util.errors import DataError

_LOADED: dict[tuple[str, str], TrainData] = {}  # per process: a worker trains many runs on one load


def _load_prepared(folder: Path, fingerprint: str, digests: tuple[Any, ...] = ()) -> TrainData:
    """Map ``folder`` once per process (later calls reuse it); refuse it if it changed since the parent looked."""
    key = (str(folder), fingerprint)
    if key not in _LOADED:
        trust_digests(list(digests))
        data = TrainData.load(folder, splits=("train", "val"))
        if data.fingerprint != fingerprint:
            raise DataError(f"{folder} changed while the grid was running (fingerprint {data.fingerprint}, "
                            f"expected {fingerprint}); re-run the train stage")
        _LOADED.clear()
        _LOADED[key] = data
    return _LOADED[key]


class DataSource(Protocol):
    """What a worker is handed instead of the data: ``load()`` gives the ``TrainData`` in that process."""

    def load(self) -> TrainData: ...


@dataclass(frozen=True)
class PreparedSource:
    """The prepared folder a worker maps (verified) instead of receiving pickled tensors.

    ``digests``: the parent's ``known_digests`` of the folder's split files,
    so each worker skips re-hashing gigabytes the parent hashed already.
    """

    folder: Path
    fingerprint: str
    digests: tuple[Any, ...] = ()

    def load(self) -> TrainData:
        return _load_prepared(self.folder, self.fingerprint, self.digests)


@dataclass(frozen=True)
class InlineSource:
    """The data itself, pickled (for a ``TrainData`` that has no folder, e.g. built in a test)."""

    data: TrainData

    def load(self) -> TrainData:
        return self.data


@dataclass(frozen=True)
class RaySource:
    """The folder when this node has it (same fingerprint), else Ray's object-store copy."""

    folder: Path
    fingerprint: str
    refs: list[Any] = field(default_factory=list)  # [ObjectRef] in a list: Ray does not resolve it eagerly

    def load(self) -> TrainData:
        with contextlib.suppress(Exception):
            if load_stats(self.folder).fingerprint == self.fingerprint:
                return _load_prepared(self.folder, self.fingerprint)
        import ray  # here, not at the top: only a Ray worker without the folder needs it

        return ray.get(self.refs[0])
