"""Unpack a .zip or .tar(.gz) of images without trusting it.

An archive from the internet can name ``../../.bashrc``, an absolute path,
a symlink to ``/etc`` or expand to terabytes. Nothing here calls
``extractall``: every member's name is checked first (a path that would
land outside the target refuses the whole archive, by name), links and
special files are never created (skipped and counted), and the bytes
actually written are capped, so a header that lies about sizes cannot fill
the disk. Extraction goes to a temp folder that replaces the target whole.
"""

from __future__ import annotations

import os
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from cnnpipe.util.errors import DataError
from cnnpipe.util.files import atomic_dir

MAX_MEMBERS = 2_000_000
MAX_BYTES = 64 * 1024**3  # what an archive may expand to
CHUNK = 1 << 20
JUNK_PARTS = ("__MACOSX",)


@dataclass(frozen=True)
class Extracted:
    files: int
    bytes: int
    skipped_links: list[str]  # symlinks / hard links / devices, never created
    skipped_junk: int  # __MACOSX/ and ._* resource forks


def safe_member_path(name: str, archive: str) -> PurePosixPath | None:
    """The relative path a member may be written to; None for the archive root itself.

    Refuses (``DataError``) absolute paths, drive letters, backslash tricks
    and any ``..`` component: such an archive is malformed or malicious.
    """
    cleaned = name.replace("\\", "/")
    path = PurePosixPath(cleaned)
    if cleaned.startswith("/") or (len(cleaned) > 1 and cleaned[1] == ":") or ".." in path.parts:
        raise DataError(f"{archive}: member {name!r} would land outside the target folder; "
                        "refusing the archive (it is malformed or malicious): re-create it with relative paths")
    parts = [part for part in path.parts if part not in ("", ".")]
    return PurePosixPath(*parts) if parts else None


def _is_junk(path: PurePosixPath) -> bool:
    return any(part in JUNK_PARTS for part in path.parts) or path.name.startswith("._")


class _Writer:
    """Writes members under ``root``, counting and capping the bytes actually written."""

    def __init__(self, root: Path, archive: str, max_bytes: int, max_members: int) -> None:
        self.root, self.archive, self.max_bytes, self.max_members = root, archive, max_bytes, max_members
        self.files = 0
        self.bytes = 0
        self.members = 0
        self.links: list[str] = []
        self.junk = 0

    def count(self) -> None:
        self.members += 1
        if self.members > self.max_members:
            raise DataError(f"{self.archive}: more than {self.max_members:,} members; refusing it (an archive bomb?)")

    def write(self, rel: PurePosixPath, stream: IO[bytes]) -> None:
        target = self.root.joinpath(*rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            raise DataError(f"{self.archive}: member {rel} is both a file and a folder; re-create the archive")
        with open(target, "wb") as out:
            while chunk := stream.read(CHUNK):
                self.bytes += len(chunk)
                if self.bytes > self.max_bytes:
                    raise DataError(f"{self.archive}: expands beyond {self.max_bytes / 1e9:.1f} GB; refusing it "
                                    "(an archive bomb?) -- unpack it yourself and point data.source at the folder")
                out.write(chunk)
        self.files += 1


def _extract_zip(path: Path, writer: _Writer) -> None:
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            writer.count()
            rel = safe_member_path(info.filename, path.name)
            if rel is None or info.is_dir():
                continue
            if _is_junk(rel):
                writer.junk += 1
                continue
            mode = info.external_attr >> 16
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # a symlink (or device) stored by a Unix zip tool
                writer.links.append(str(rel))
                continue
            with archive.open(info) as stream:
                writer.write(rel, stream)


def _extract_tar(path: Path, writer: _Writer) -> None:
    with tarfile.open(path, mode="r:*") as archive:
        for member in archive:
            writer.count()
            rel = safe_member_path(member.name, path.name)
            if rel is None or member.isdir():
                continue
            if _is_junk(rel):
                writer.junk += 1
                continue
            if not member.isfile():  # symlink, hard link, fifo, device: never created
                writer.links.append(str(rel))
                continue
            stream = archive.extractfile(member)
            if stream is None:
                writer.links.append(str(rel))
                continue
            with stream:
                writer.write(rel, stream)


def safe_extract(path: str | os.PathLike[str], dest: str | os.PathLike[str], *,
                 max_bytes: int = MAX_BYTES, max_members: int = MAX_MEMBERS) -> Extracted:
    """Unpack the archive at ``path`` into ``dest`` (replaced whole, only on success)."""
    source = Path(path)
    name = source.name.lower()
    with atomic_dir(dest) as tmp:
        writer = _Writer(tmp, source.name, max_bytes, max_members)
        try:
            if name.endswith(".zip"):
                _extract_zip(source, writer)
            else:
                _extract_tar(source, writer)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as err:
            if isinstance(err, OSError) and err.errno is not None:
                raise DataError(f"{source.name}: cannot unpack into {dest} ({err.strerror}); free some space or fix permissions") from None
            raise DataError(f"{source.name}: not a readable archive ({type(err).__name__}: {err}); re-download it") from None
        if writer.files == 0:
            raise DataError(f"{source.name}: the archive holds no files; check data.source")
    return Extracted(writer.files, writer.bytes, writer.links, writer.junk)
