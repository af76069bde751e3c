"""Shared fixtures: keep tests offline, quiet and on the CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture
def project_root() -> Path:
    return ROOT


@pytest.fixture
def prepared_dir(tmp_path: Path) -> Path:
    """A tiny synthetic prepared-data folder (1x28x28, 10 classes)."""
    from synthetic import make_prepared

    out = tmp_path / "prepared"
    make_prepared(out)
    return out
