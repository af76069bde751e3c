"""Fetch a dataset's raw files from the first source that serves a verified copy.

For each file the sources (``cnnpipe.data.sources``) are tried in order. A
copy is streamed into a hidden temp file *inside* the target folder, checked,
and only then renamed into place, so ``data/raw/<dataset>/`` never holds a
partial or unverified file. A copy is accepted when

1. its archive MD5 is upstream's, or
2. the SHA-256 of its decompressed content matches (``data.checksums`` pins
   override the registry): mirrors such as Debian re-compress the files,
   which changes the wrapper but not the dataset;

and it always has to parse (gzip CRC, IDX sizes, readable tar), which catches
truncation and HTML error pages even when no checksum is known.

Network errors and truncation are retried with exponential backoff; HTTP
errors, redirect loops and bad content move on to the next source. When every
source fails the user gets one line listing what was tried and why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cnnpipe.data.formats import RawCheck, RawFormatError, inspect_raw
from cnnpipe.data.registry import DatasetSpec, RawFile
from cnnpipe.data.sources import Source, sources_for
from cnnpipe.util.retry import retrying
from cnnpipe.util.transfer import Rejected as _Rejected
from cnnpipe.util.transfer import Transient as _Transient
from cnnpipe.util.transfer import copy_stream as _copy
from cnnpipe.util.transfer import fatal_if_disk_full as _fatal_if_disk_full
from cnnpipe.util.transfer import fetch_http as _fetch_http
from cnnpipe.util.errors import DataError

TEMP_SUFFIX = ".part"
MAX_BACKOFF = 30.0  # seconds


@dataclass(frozen=True)
class Fetched:
    """How one raw file got (or already was) into place."""

    name: str
    source: str | None  # where it came from; None when it was already present
    verified_by: str  # "upstream MD5" | "content SHA-256" | ...
    note: str = ""

    def describe(self) -> str:
        if self.source is None:
            return f"{self.name}: already present ({self.verified_by} verified)"
        extra = f"; {self.note}" if self.note else ""
        return f"{self.name} <- {self.source} ({self.verified_by} verified{extra})"


# --------------------------------------------------------------------------- verification


def _judge(raw: RawFile, check: RawCheck, pins: Mapping[str, str], pin_key: str = "data.checksums") -> Fetched | None:
    """Accept a format-checked copy by archive MD5, else by content SHA-256."""
    if raw.md5 and check.md5 == raw.md5:
        return Fetched(raw.name, None, "upstream MD5")
    expected = pins.get(raw.name) or raw.content_sha256
    if expected and check.content_sha256 == expected:
        where = pin_key if raw.name in pins else "registry"
        note = "archive MD5 differs from upstream's: re-compressed, same data" if raw.md5 else ""
        return Fetched(raw.name, None, f"content SHA-256 ({where})", note)
    return None


def verify_file(path: Path, spec: DatasetSpec, raw: RawFile, pins: Mapping[str, str]) -> Fetched:
    """Check ``path`` as a copy of ``raw``; raise ``_Transient`` / ``_Rejected`` with a short reason."""
    try:
        check = inspect_raw(path, fmt=spec.format, role=raw.role, image_shape=spec.image_shape)
    except RawFormatError as err:
        raise (_Transient if err.truncated else _Rejected)(err.reason) from None
    verdict = _judge(raw, check, pins, "data.sha256" if spec.is_folder else "data.checksums")
    if verdict is None:
        if spec.is_folder and not pins.get(raw.name):  # your own archive: pinning (data.sha256) is optional
            return Fetched(raw.name, None, f"readable {check.detail}; unpinned")
        if not (raw.md5 or pins.get(raw.name) or raw.content_sha256):
            raise _Rejected("no checksum known; pin it in data.checksums")
        if spec.is_folder:
            raise _Rejected(f"SHA-256 {check.content_sha256} is not data.sha256's")
        raise _Rejected("checksum mismatch")
    return verdict


def _fetch_local(path: Path, out: IO[bytes], name: str, progress: bool) -> None:
    if not path.is_file():
        raise _Rejected("missing")
    try:
        with open(path, "rb") as stream:
            _copy(stream, out, path.stat().st_size, name, progress)
    except PermissionError:
        raise _Rejected("not readable (permission denied)") from None
    except OSError as err:
        _fatal_if_disk_full(err, out)
        raise _Transient(f"read error: {err}") from None


def _attempt(source: Source, spec: DatasetSpec, raw: RawFile, dest: Path, pins: Mapping[str, str],
             timeout: float, progress: bool) -> Fetched:
    """One try: stream into a temp file beside the target, verify, rename into place."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{raw.name}.", suffix=TEMP_SUFFIX, dir=dest)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with open(tmp, "wb") as out:
            if source.is_remote:
                _fetch_http(source.locate(raw.name), out, raw.name, timeout, progress)
            else:
                _fetch_local(Path(source.locate(raw.name)), out, raw.name, progress)
            out.flush()
            os.fsync(out.fileno())
        verdict = verify_file(tmp, spec, raw, pins)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest / raw.name)
        return Fetched(raw.name, source.location, verdict.verified_by, verdict.note)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# --------------------------------------------------------------------------- orchestration


def fetch_file(
    spec: DatasetSpec,
    raw: RawFile,
    dest: Path,
    sources: Iterable[Source],
    *,
    pins: Mapping[str, str],
    timeout: float,
    retries: int,
    backoff: float,
    progress: bool,
) -> Fetched:
    """Get one file from the first source whose copy verifies; one-line DataError otherwise."""
    tried: list[str] = []
    for source in sources:
        try:  # a local copy reads the same every time: only a remote one is tried again
            return retrying(lambda: _attempt(source, spec, raw, dest, pins, timeout, progress), retries=retries,
                            delay=backoff, max_delay=MAX_BACKOFF,
                            transient=lambda err: isinstance(err, _Transient) and source.is_remote)
        except _Rejected as err:
            tried.append(f"{source} ({err})")
        except _Transient as err:
            times = f"; {retries + 1} attempts" if source.is_remote and retries else ""
            tried.append(f"{source} ({err}{times})")
    fix = ("check data.source and data.sha256, or your network" if spec.is_folder
           else "add a mirror in data.mirrors (a folder or URL holding the files) or check your network")
    raise DataError(f"{spec.name}: could not get {raw.name}: {', '.join(tried) or 'no sources'}; {fix}")


def _present(path: Path, spec: DatasetSpec, raw: RawFile, pins: Mapping[str, str],
             echo: Callable[[str], None] | None) -> Fetched | None:
    """The existing copy if it verifies; a bad one is removed (never left in place)."""
    if not path.is_file():
        return None
    try:
        verdict = verify_file(path, spec, raw, pins)
    except (_Transient, _Rejected) as err:
        path.unlink()
        if echo is not None:
            echo(f"{raw.name}: the copy in {path.parent} failed verification ({err}); removed it, fetching again")
        return None
    return Fetched(raw.name, None, verdict.verified_by, verdict.note)


def _clean_temp(dest: Path) -> None:
    """Remove temp files a killed earlier run left behind."""
    for stale in dest.glob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(OSError):
            stale.unlink()


def download_dataset(
    spec: DatasetSpec,
    dest: str | os.PathLike[str],
    *,
    mirrors: Iterable[str] = (),
    checksums: Mapping[str, str] | None = None,
    timeout: float = 30.0,
    retries: int = 3,
    backoff: float = 1.0,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
    base_dir: str | os.PathLike[str] | None = None,
) -> list[Fetched]:
    """Make ``dest`` hold every raw file of ``spec``, each verified.

    Files already present and verified are kept. ``checksums`` maps a file
    name to the SHA-256 of its decompressed content (``data.checksums``).
    """
    folder = Path(dest)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    _clean_temp(folder)
    pins = dict(checksums or {})
    sources = sources_for(spec, mirrors, base_dir=base_dir)
    results: list[Fetched] = []
    try:
        for raw in spec.files:
            fetched = _present(folder / raw.name, spec, raw, pins, echo) or fetch_file(
                spec, raw, folder, sources, pins=pins, timeout=timeout, retries=retries,
                backoff=backoff, progress=progress,
            )
            results.append(fetched)
            if echo is not None:
                echo(fetched.describe())
    except BaseException:
        if created and not any(folder.iterdir()):
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return results
