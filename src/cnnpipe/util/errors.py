"""One-line user-facing errors.

Every problem a user can fix (bad params, bad download, foreign checkpoint)
is raised as a ``CnnpipeError`` subclass whose message already names the
problem and the fix. Entry points wrap their body in ``run_entry_point`` so
the user sees that single line and an exit code, never a traceback, unless
``CNNPIPE_DEBUG=1`` asks for one.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn
from cnnpipe.util.env import DEBUG, flag


class CnnpipeError(Exception):
    """A problem the user can fix; ``str(err)`` is the whole message."""

    exit_code = 1


class ParamsError(CnnpipeError):
    """``params.yaml`` is malformed or inconsistent (exit 2, nothing written)."""

    exit_code = 2

    def __init__(self, message: str, source: str = "params.yaml") -> None:
        self.source = source
        self.message = message  # without the source prefix
        super().__init__(f"{source}: {message}" if source else message)


class DataError(CnnpipeError):
    """A dataset could not be fetched, verified or decoded."""


class CheckpointError(CnnpipeError):
    """A checkpoint is missing, truncated, foreign or unsafe to load."""


class TrackingError(CnnpipeError):
    """The MLflow tracking store is unreachable or rejected a write."""


def debug_enabled() -> bool:
    """``CNNPIPE_DEBUG`` is on: show tracebacks instead of one-line errors."""
    return flag(DEBUG)


def fail(err: CnnpipeError) -> NoReturn:
    """Print ``err`` as one line on stderr and exit with its code."""
    message = " ".join(str(err).split("\n")).strip()
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(err.exit_code)


def answer_help(script: str, doc: str | None) -> None:
    """``--help`` for a stage script that takes no arguments (dvc runs it bare), before any heavy import."""
    import argparse

    argparse.ArgumentParser(prog=f"stages/{os.path.basename(script)}", description=doc,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()


def run_entry_point(main: Callable[[], int | None]) -> NoReturn:
    """Run ``main`` turning known errors into one line and an exit code.

    Ctrl-C exits 130 with a short message; ``CNNPIPE_DEBUG=1`` re-raises so
    the traceback is visible.

    On the way out every live object is frozen for the garbage collector
    (``gc.freeze``): the interpreter's last collection over torch's and
    mlflow's module graphs was a noticeable part of a cached ``dvc exp run``
    (figures in benchmarks/README.md). Nothing depends on it: outputs are
    closed and renamed before ``main`` returns, and atexit handlers still
    run.
    """
    import gc

    try:
        code = main()
    except CnnpipeError as err:
        if debug_enabled():
            raise
        fail(err)
    except KeyboardInterrupt:
        if debug_enabled():
            raise
        print("interrupted: stopped cleanly (Ctrl-C); no output was replaced", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    finally:
        gc.freeze()
    raise SystemExit(code or 0)
