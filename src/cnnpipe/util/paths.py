"""Where the project root is, even inside a queued ``dvc exp`` temp copy.

``dvc exp run --queue`` runs stages in ``.dvc/tmp/exps/tmpXXXX`` with
``DVC_ROOT`` pointing at the parent repo: anything that must outlive the
experiment (the MLflow store, the run cache) is anchored there.
"""

from __future__ import annotations

import os
from pathlib import Path


def project_root(start: str | os.PathLike[str] | None = None) -> Path:
    """``$DVC_ROOT`` when set, else the nearest folder holding ``.dvc`` or ``dvc.yaml``, else cwd."""
    env_root = os.environ.get("DVC_ROOT")
    if env_root:
        return Path(env_root).resolve()
    here = Path(start or os.getcwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir() or (folder / "dvc.yaml").is_file():
            return folder
    return here


def work_dir() -> Path:
    """The folder the stage runs in (the experiment's copy for queued runs)."""
    return Path(os.getcwd()).resolve()
