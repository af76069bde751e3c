"""Copying a URL to an open file: a progress bar for large files, and every failure classified.

``Transient`` is worth another attempt at the same URL (a network error, a
timeout, a truncated transfer); ``Rejected`` means this source will not do
(an HTTP error status, a redirect loop). A full disk is neither: it stops
at once (``fatal_if_disk_full``). Used by the dataset download and the
weights stage's downloads alike.
"""

from __future__ import annotations

import errno
import http.client
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Any

from cnnpipe import __version__
from cnnpipe.util.errors import DataError

USER_AGENT = f"cnnpipe/{__version__} (download; python-urllib)"
CHUNK = 1 << 16
PROGRESS_MIN_BYTES = 1 << 20  # no bar for small files (label files)


class Transient(Exception):
    """Worth another attempt at the same source (network error, truncation)."""


class Rejected(Exception):
    """This source will not do; move on to the next one."""




def progress_bar(total: int | None, name: str, enabled: bool) -> Any:
    from tqdm import tqdm

    show = enabled and (total is None or total >= PROGRESS_MIN_BYTES)
    return tqdm(
        total=total, desc=name, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
        disable=None if show else True, file=sys.stderr, dynamic_ncols=True,
    )


def copy_stream(stream: IO[bytes], out: IO[bytes], total: int | None, name: str, progress: bool) -> int:
    written = 0
    with progress_bar(total, name, progress) as bar:
        while chunk := stream.read(CHUNK):
            out.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    return written


class _NoRedirectLoops(urllib.request.HTTPRedirectHandler):
    """urllib's handler, with a short limit: a loop should fail fast, not after 10 hops."""

    max_redirections = 5
    max_repeats = 2


def _opener() -> urllib.request.OpenerDirector:
    opener = urllib.request.build_opener(_NoRedirectLoops())
    opener.addheaders = [("User-Agent", USER_AGENT), ("Accept-Encoding", "identity")]
    return opener


def fetch_http(url: str, out: IO[bytes], name: str, timeout: float, progress: bool) -> None:
    try:
        with _opener().open(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            written = copy_stream(response, out, total, name, progress)
    except urllib.error.HTTPError as err:
        if 300 <= err.code < 400:
            raise Rejected(f"redirect loop (HTTP {err.code})") from None
        raise Rejected(f"HTTP {err.code} {err.reason}".strip()) from None
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise Transient(f"timed out after {timeout:g} s") from None
        if isinstance(reason, socket.gaierror):
            raise Transient(f"unknown host ({reason.strerror})") from None
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        raise Transient(f"network error: {text.lower()}") from None
    except (socket.timeout, TimeoutError):
        raise Transient(f"timed out after {timeout:g} s") from None
    except http.client.IncompleteRead as err:
        raise Transient(f"truncated: connection closed after {len(err.partial)} bytes") from None
    except (http.client.HTTPException, ConnectionError, OSError) as err:
        fatal_if_disk_full(err, out)
        raise Transient(f"network error: {type(err).__name__}: {err}".rstrip(": ")) from None
    if total is not None and written != total:
        raise Transient(f"truncated: got {written} of {total} bytes")


def fatal_if_disk_full(err: BaseException, out: IO[bytes]) -> None:
    """A full disk is not the source's fault: stop with one line instead of trying every mirror."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        folder = Path(getattr(out, "name", ".")).parent
        raise DataError(f"no space left on the device holding {folder}; free some space and re-run the stage") from None
