"""Environment switches (``CNNPIPE_*``): one reading rule for every flag.

A flag is off when unset or empty (unless its default says on), and when set
to ``0``, ``false``, ``no`` or ``off`` (any case); any other value turns it
on. So ``CNNPIPE_DEBUG=false`` means off everywhere, never on in one module
and off in another.
"""

from __future__ import annotations

import os

OFF = ("0", "false", "no", "off")

DEBUG = "CNNPIPE_DEBUG"  # tracebacks instead of one-line errors
NO_CACHE = "CNNPIPE_NO_CACHE"  # recompute every stored result (and store the fresh ones)
PROGRESS = "CNNPIPE_PROGRESS"  # tqdm bars on a terminal (default on; 0: plain lines)
TAKE_TURNS = "CNNPIPE_TAKE_TURNS"  # concurrent experiments compute one at a time (default on)
PROGRESS_EVERY = "CNNPIPE_PROGRESS_EVERY"  # seconds between mid-epoch lines when not a terminal (0: none)
FEATURES = "CNNPIPE_FEATURES"  # a frozen body's features computed once and reused (default on)
CACHE_DIR = "CNNPIPE_CACHE_DIR"  # where .cnnpipe-cache/runs lives (the other stores beside it)
RECORD_PARAMS = "CNNPIPE_RECORD_PARAMS"  # a folder: each stage process writes the params keys it read there (tests)


def flag(name: str, default: bool = False) -> bool:
    """The switch ``name``: ``default`` when unset or empty, off for 0/false/no/off, on for anything else."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    return value not in OFF


def progress_bars(asked: bool) -> bool:
    """tqdm bars: asked for, on a terminal (stderr), and not turned off with ``CNNPIPE_PROGRESS=0``."""
    import sys

    return bool(asked) and sys.stderr.isatty() and flag(PROGRESS, default=True)


def number(name: str, default: float) -> float:
    """A numeric setting: ``default`` when unset, empty or not a number."""
    try:
        return float(os.environ.get(name, "").strip() or default)
    except ValueError:
        return default


def text(name: str) -> str | None:
    """A setting's value (None when unset or empty)."""
    value = os.environ.get(name, "").strip()
    return value or None
