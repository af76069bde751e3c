"""Which params keys a stage really reads, recorded while it runs, so ``dvc.yaml`` can be checked against it.

A stage's ``params:`` list in ``dvc.yaml`` is what DVC compares to decide
whether the stage is stale: a key the stage reads but does not declare lets
``dvc repro`` keep a result computed from another value. With
``CNNPIPE_RECORD_PARAMS=<folder>`` every read of a params field (a section's
or a training value's attribute) is noted by its dotted key (``data.dataset``,
``lr``), and the process writes the keys to ``<folder>/<stage>-<pid>.json``
when it exits; ``tests/test_stage_params.py`` compares them with
``dvc.yaml``. Without the variable nothing is recorded (one dict lookup a read).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from cnnpipe.util.env import RECORD_PARAMS, text

_FOLDER = text(RECORD_PARAMS)
READ: set[str] | None = set() if _FOLDER else None  # None: not recording


_PAUSED = [0]


def note(key: str) -> None:
    """Record that ``key`` (a dotted params key) was read."""
    if READ is not None and not _PAUSED[0]:
        READ.add(key)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """No recording inside: validating the file reads every key, which is checking it, not using it."""
    _PAUSED[0] += 1
    try:
        yield
    finally:
        _PAUSED[0] -= 1


def stage_name() -> str:
    """The stage this process runs: ``$DVC_STAGE``, else the script's name (``stages/train.py`` -> ``train``)."""
    return os.environ.get("DVC_STAGE") or Path(sys.argv[0]).stem


def _write() -> None:
    if READ is None or _FOLDER is None:
        return
    folder = Path(_FOLDER)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stage_name()}-{os.getpid()}.json").write_text(json.dumps(sorted(READ)) + "\n", encoding="utf-8")


if READ is not None:
    atexit.register(_write)
