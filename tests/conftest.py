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


# A user's shell (or a `dvc exp run` around pytest) may export these; they would
# send a test's runs to another store, experiment or Ray cluster.
ISOLATED_ENV = ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE",
                "RAY_ADDRESS", "CNNPIPE_NO_CACHE")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files marked ``long(seconds)`` go first, longest first; the others follow in collection order.

    ``--dist loadfile --no-loadscope-reorder`` (``make test``) hands files to
    workers in this order (xdist's default reorders them by test count, which
    starts the one-test README file last). Longest first is the classic
    schedule for parallel jobs of known lengths: a file of many short tests
    fills the end, and no worker starts a minutes-long chain of pipeline runs
    when the others are nearly done. The seconds only order the files: a
    stale figure costs speed, never a result.
    """
    seconds: dict[Path, float] = {}
    for item in items:
        marker = item.get_closest_marker("long")
        seconds[item.path] = max(seconds.get(item.path, 0.0), float(marker.args[0]) if marker else 0.0)
    items.sort(key=lambda item: -seconds[item.path])


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ISOLATED_ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic prepared data (300 train / 100 val / 20 test, 1x28x28, 10 classes), once per module."""
    from synthetic import make_prepared

    folder = tmp_path_factory.mktemp("prepared")
    make_prepared(folder, n_train=300, n_val=100, n_test=20)
    return folder


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
