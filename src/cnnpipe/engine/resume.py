"""Per-epoch resume state: everything needed to continue a run bit-for-bit.

One file, ``<resume_dir>/resume.pt``, rewritten atomically after every
epoch: model, optimizer and scheduler states, the shuffling/augmentation
generator and torch's global RNG (dropout), the history so far and the
early-stopping state with its best weights. It is written with
``torch.save`` and read back with ``torch.load(weights_only=True)``, which
only rebuilds tensors and plain containers (no code runs), and only for a
state whose ``run_id`` and data fingerprint match the run being started.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cnnpipe.errors import CheckpointError
from cnnpipe.fsutil import atomic_path

RESUME_FILE = "resume.pt"
RESUME_FORMAT = "cnnpipe-resume/1"


def resume_path(resume_dir: str | os.PathLike[str]) -> Path:
    return Path(resume_dir) / RESUME_FILE


def save_resume_state(resume_dir: str | os.PathLike[str], state: dict[str, Any]) -> None:
    path = resume_path(resume_dir)
    with atomic_path(path) as tmp:
        torch.save({"format": RESUME_FORMAT, **state}, tmp)


def load_resume_state(resume_dir: str | os.PathLike[str], run_id: str, fingerprint: str) -> dict[str, Any] | None:
    """The saved state for this run and data, or None (absent, another run, other data)."""
    path = resume_path(resume_dir)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable, truncated or not ours: refuse with the fix
        raise CheckpointError(f"{path}: unreadable resume state ({type(err).__name__}); delete it to start the run afresh") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(f"{path}: not a cnnpipe resume state; delete it to start the run afresh")
    if state.get("run_id") != run_id or state.get("data_fingerprint") != fingerprint:
        return None
    return state
