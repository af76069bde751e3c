"""Mid-epoch progress lines for output that is not a terminal.

A terminal gets a tqdm bar per epoch (``engine.loop``). Elsewhere (``dvc
queue logs``, CI, a pipe, a grid worker) the search prints one line per
epoch, which leaves a long epoch silent for minutes: an epoch running longer
than ``CNNPIPE_PROGRESS_EVERY`` seconds (default 30) also prints a flushed
line that often. The loop checks the clock once a batch, so short epochs
pay nothing and print nothing.
"""

from __future__ import annotations

from cnnpipe.util.env import PROGRESS_EVERY, number

PROGRESS_EVERY_S = 30.0  # a long epoch without a bar prints a line at least this often (CNNPIPE_PROGRESS_EVERY)


def progress_every() -> float | None:
    """Seconds between mid-epoch progress lines (``CNNPIPE_PROGRESS_EVERY``; 0 turns them off)."""
    every = number(PROGRESS_EVERY, PROGRESS_EVERY_S)
    return every if every > 0 else None


def clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def progress_line(name: str, epoch: int, epochs: int, done: int, total: int, images: int, seconds: float) -> str:
    """``[lr=0.01] epoch 2/8: batch 120/469 (26%), 1830 images/s, ETA 3m12s`` (mid-epoch, not a terminal)."""
    rate = images / seconds if seconds > 0 else 0.0
    eta = seconds / done * (total - done) if done else 0.0
    return (f"[{name}] epoch {epoch}/{epochs}: batch {done}/{total} ({100 * done // max(1, total)}%), "
            f"{rate:.0f} images/s, ETA {clock(eta)}")
