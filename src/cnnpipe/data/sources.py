"""Where raw files come from: the ordered list of places the download stage tries.

Order matters and is fixed: the user's ``data.mirrors`` first (a private or
faster copy should win), then OS-packaged copies such as Debian's
``/usr/share/datasets/fashion-mnist`` (offline machines), then upstream. A
source only knows *where* a file would be; fetching, verification and retries
live in ``cnnpipe.data.download``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from cnnpipe.data.registry import DatasetSpec

REMOTE_SCHEMES = ("http", "https")


@dataclass(frozen=True)
class Source:
    """One place to look: a local folder or a remote base URL."""

    kind: str  # "mirror" | "system" | "upstream"
    location: str  # absolute folder path, or a base URL ending in "/"

    @property
    def is_remote(self) -> bool:
        return urlparse(self.location).scheme in REMOTE_SCHEMES

    def locate(self, file_name: str) -> str:
        """The URL or path of ``file_name`` in this source."""
        if self.is_remote:
            return self.location + file_name
        return str(Path(self.location) / file_name)

    def __str__(self) -> str:
        return self.location


def _base_url(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def mirror_source(entry: str, base_dir: str | os.PathLike[str] | None = None) -> Source:
    """A ``data.mirrors`` entry: an http(s) base URL, a ``file://`` URL or a folder.

    Relative folders are taken from ``base_dir``: the stage passes the project
    root, so a queued ``dvc exp`` (run in a temp copy) finds the same folder.
    """
    parsed = urlparse(entry)
    if parsed.scheme in REMOTE_SCHEMES:
        return Source("mirror", _base_url(entry))
    if parsed.scheme == "file":
        folder = Path(url2pathname(unquote(parsed.path)))
    else:
        folder = Path(entry).expanduser()
    if not folder.is_absolute():
        folder = Path(base_dir or os.getcwd()) / folder
    return Source("mirror", os.path.normpath(folder))


def sources_for(
    spec: DatasetSpec,
    mirrors: Iterable[str] = (),
    *,
    base_dir: str | os.PathLike[str] | None = None,
) -> list[Source]:
    """Every source for ``spec`` in the order they are tried, without duplicates."""
    found: list[Source] = [mirror_source(entry, base_dir) for entry in mirrors]
    found += [Source("system", os.path.normpath(folder)) for folder in spec.system_dirs]
    found += [Source("upstream", _base_url(url)) for url in spec.urls]
    unique: list[Source] = []
    seen: set[str] = set()
    for source in found:
        if source.location not in seen:
            seen.add(source.location)
            unique.append(source)
    return unique
