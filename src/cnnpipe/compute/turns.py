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

By default concurrent experiments *take turns* instead (``compute_turn``): the
heavy part of a train (its epochs) or an evaluate (its forward passes) holds
one lock file at the project root, ``.cnnpipe-cores/turn.lock``, so only one
of them computes at a time, with all the threads it planned, while the others
do everything around it (DVC's queue handling, imports, data loading, MLflow,
figures). Nothing oversubscribes the cores and every result keeps its bits.
``CNNPIPE_TAKE_TURNS=0`` turns that off (every process computes at once, as
torch does by default).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cnnpipe.util.paths import project_root

LEDGER_DIR = ".cnnpipe-cores"
SHARE_ENV = "CNNPIPE_SHARE_CORES"
TURNS_ENV = "CNNPIPE_TAKE_TURNS"
TURN_FILE = "turn.lock"  # no "-" in the name: the claim glob never counts it
_claim: Path | None = None
_turn_depth = 0  # nested turns in one process (a flock on a second descriptor would wait for itself)


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


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    return default if not value else value not in ("0", "false", "no", "off")


def sharing() -> bool:
    return _flag(SHARE_ENV, False)


def taking_turns() -> bool:
    """Concurrent experiments compute one at a time: the default, unless they share threads or opted out."""
    return _flag(TURNS_ENV, True) and not sharing()


@contextlib.contextmanager
def compute_turn(what: str, *, report: Callable[[str], None] | None = print, root: Path | None = None) -> Iterator[None]:
    """Hold this machine's compute turn for the project while the block runs (see the module docstring).

    Waits, saying once who holds it, while another train or evaluate of the
    same project computes. A no-op with ``CNNPIPE_TAKE_TURNS=0``, with
    ``CNNPIPE_SHARE_CORES=1``, and inside a turn this process already holds.
    The kernel drops the lock when its holder exits, ``kill -9`` included.
    """
    global _turn_depth
    if _turn_depth or not taking_turns():
        _turn_depth += 1
        try:
            yield
        finally:
            _turn_depth -= 1
        return
    folder = (root or project_root()) / LEDGER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / TURN_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
            if report is not None:
                report(f"{what}: waiting for the cores: {holder} is computing (concurrent experiments on this "
                       f"machine take turns; {SHARE_ENV}=1 shares the cores instead, {TURNS_ENV}=0 computes at once)")
            started = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            if report is not None:
                report(f"{what}: got the cores after waiting {time.monotonic() - started:.0f} s")
        experiment = os.environ.get("DVC_EXP_NAME")
        label = f"the {what} of experiment {experiment} (pid {os.getpid()})" if experiment else \
            f"the {what} of pid {os.getpid()}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, label.encode(), 0)
        _turn_depth += 1
        try:
            yield
        finally:
            _turn_depth -= 1
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


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

    from cnnpipe.compute.device import default_threads

    threads = share(default_threads())
    if _claim is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()
