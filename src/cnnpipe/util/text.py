"""Text for one-line messages."""

from __future__ import annotations


def one_line(text: object, limit: int = 400) -> str:
    """``text`` with all whitespace runs (newlines too) collapsed to one space, cut to ``limit`` with ``...``."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
