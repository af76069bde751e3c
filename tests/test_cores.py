"""The core ledger: concurrent trains on one machine split its cores instead of each taking all."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cnnpipe import cores


@pytest.fixture
def ledger(tmp_path: Path):
    yield tmp_path
    cores.release()


def test_unclaimed_processes_keep_every_core(ledger: Path, monkeypatch) -> None:
    assert cores.share(8) == 8
    monkeypatch.delenv(cores.SHARE_ENV, raising=False)
    assert cores.claim(ledger) is None and cores.share(8) == 8  # opt-in: by default threads stay as planned


def test_claims_split_the_cores_and_dead_claims_are_dropped(ledger: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    try:
        mine = cores.claim(ledger, force=True)
        assert mine.parent == ledger / cores.LEDGER_DIR and cores.claim(ledger, force=True) == mine  # idempotent
        assert cores.share(4) == 4  # alone
        folder = mine.parent
        (folder / f"{cores._host()}-{sleeper.pid}").touch()
        stale = folder / f"{cores._host()}-{dead.stdout.strip()}"
        stale.touch()
        assert cores.share(4) == 2 and cores.share(3) == 1 and cores.share(1) == 1
        assert not stale.exists()  # a claim of a dead process is removed by the reader
        sleeper.kill()
        sleeper.wait()
        assert cores.share(4) == 4  # the other train ended: all cores again
    finally:
        sleeper.kill()
    cores.release()
    assert not mine.exists() and cores.share(4) == 4
