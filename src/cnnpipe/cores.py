"""Share one machine's cores between concurrent trains (queue workers, parallel ``dvc exp run``).

Every torch process takes all the cores it sees by default, so two
experiments run by ``dvc queue start -j 2`` ask for twice the cores there are
and both slow down (OpenMP threads spin on the cores the other needs). The
ledger fixes that without a daemon: a train or evaluate stage *claims* a
slot, one empty file ``<project root>/.cnnpipe-cores/<host>-<pid>``, and its
share is ``cores // live claims`` (at least 1). The claim goes when the
process exits; a claim of a dead process (``kill -9``) is dropped by the next
reader. ``rebalance`` re-reads the ledger (called between epochs), so a run
that started alone gives cores back when a second one starts and takes them
again when it ends.

Processes that never claim (tests, library use, grid worker processes that
the executor already gave a fixed thread count) are not affected.

Opt-in (``CNNPIPE_SHARE_CORES=1``): on a CPU the thread count changes the last
bits of the results, so a share that depends on how many experiments happen
to run at once would trade bit-for-bit reproducibility (and bitwise resume)
for throughput. By default every train uses the same planned threads.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
from pathlib import Path

from cnnpipe.paths import project_root

LEDGER_DIR = ".cnnpipe-cores"
SHARE_ENV = "CNNPIPE_SHARE_CORES"
_claim: Path | None = None


def _host() -> str:
    return socket.gethostname().replace("-", "_")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def sharing() -> bool:
    return os.environ.get(SHARE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def claim(root: Path | None = None, *, force: bool = False) -> Path | None:
    """Register this process as a core user at the project root (idempotent; released at exit).

    Only with ``CNNPIPE_SHARE_CORES=1`` (or ``force``); otherwise None and nothing changes.
    """
    global _claim
    if not (force or sharing()):
        return None
    if _claim is None:
        folder = (root or project_root()) / LEDGER_DIR
        folder.mkdir(parents=True, exist_ok=True)
        _claim = folder / f"{_host()}-{os.getpid()}"
        _claim.touch()
        atexit.register(release)
    return _claim


def release() -> None:
    """Drop this process's claim (also done at exit)."""
    global _claim
    if _claim is not None:
        with contextlib.suppress(OSError):
            _claim.unlink()
        _claim = None


def live_claims(folder: Path) -> int:
    """Claims of live processes on this host (dead ones are removed); other hosts' count as live."""
    count = 0
    host = _host()
    for entry in folder.glob("*-*"):
        name, _, pid = entry.name.rpartition("-")
        if name == host and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                entry.unlink()
            continue
        count += 1
    return count


def share(total: int) -> int:
    """This process's share of ``total`` cores: all of them unless it claimed a slot."""
    if _claim is None:
        return total
    return max(1, total // max(1, live_claims(_claim.parent)))


def rebalance() -> int:
    """Set torch's intra-op threads to this process's current share (claimed processes only); returns it."""
    import torch

    from cnnpipe.device import default_threads

    threads = share(default_threads())
    if _claim is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
