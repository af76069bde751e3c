"""The machine's compute turn: concurrent experiments on one machine compute one at a time.

Every torch process takes all the cores it sees, so two experiments run by
``dvc queue start -j 2`` would ask for twice the cores there are and both
slow down (OpenMP threads spin on the cores the other needs). Instead, the
heavy part of a train (its epochs) or an evaluate (its forward passes) holds
one lock at the project root, ``.cnnpipe-cores/turn.lock``: only one of them
computes at a time, with all the threads it planned, while the others do
everything around it (DVC's queue handling, imports, data loading, MLflow,
figures). Nothing oversubscribes the cores and every result keeps its bits
(on a CPU the thread count changes the last bits, so sharing the cores
between running experiments would make results depend on what else ran).

A waiting stage says once who holds the turn (``turn.holder`` beside the
lock names it) and how long it waited. ``CNNPIPE_TAKE_TURNS=0`` turns this
off (every process computes at once, as torch does by default). The kernel
drops the lock when its holder exits, ``kill -9`` included.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from cnnpipe.util.env import TAKE_TURNS, flag
from cnnpipe.util.files import atomic_write_text
from cnnpipe.util.locks import held
from cnnpipe.util.paths import project_root

TURN_DIR = ".cnnpipe-cores"
TURN_FILE = "turn.lock"
HOLDER_FILE = "turn.holder"
_turn_depth = 0  # nested turns in one process (a second lock object would wait for this process itself)


def taking_turns() -> bool:
    """Concurrent experiments compute one at a time: the default, unless ``CNNPIPE_TAKE_TURNS=0``."""
    return flag(TAKE_TURNS, default=True)


@contextlib.contextmanager
def compute_turn(what: str, *, report: Callable[[str], None] | None = print, root: Path | None = None) -> Iterator[None]:
    """Hold this machine's compute turn for the project while the block runs (see the module docstring).

    Waits, saying once who holds it, while another train or evaluate of the
    same project computes. A no-op with ``CNNPIPE_TAKE_TURNS=0`` and inside a
    turn this process already holds.
    """
    global _turn_depth
    if _turn_depth or not taking_turns():
        _turn_depth += 1
        try:
            yield
        finally:
            _turn_depth -= 1
        return
    folder = (root or project_root()) / TURN_DIR
    holder_file = folder / HOLDER_FILE
    waited: list[float] = []

    def on_wait() -> None:
        waited.append(time.monotonic())
        if report is not None:
            try:
                holder = holder_file.read_text(encoding="utf-8").strip() or "another process"
            except OSError:
                holder = "another process"
            report(f"{what}: waiting for the cores: {holder} is computing (concurrent experiments on this "
                   f"machine take turns; {TAKE_TURNS}=0 computes at once)")

    with held(folder / TURN_FILE, on_wait=on_wait):
        if waited and report is not None:
            report(f"{what}: got the cores after waiting {time.monotonic() - waited[0]:.0f} s")
        experiment = os.environ.get("DVC_EXP_NAME")
        label = f"the {what} of experiment {experiment} (pid {os.getpid()})" if experiment else \
            f"the {what} of pid {os.getpid()}"
        atomic_write_text(holder_file, label)
        _turn_depth += 1
        try:
            yield
        finally:
            _turn_depth -= 1
