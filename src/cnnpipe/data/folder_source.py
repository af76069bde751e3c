"""The download stage for ``data.dataset: folder``: make ``data/raw/folder/`` describe the images.

* A local folder (``dvc add my_images``) is used in place, never copied: the
  stage writes ``source.json`` with the tree's digest. DVC re-runs the stage
  when the folder changes (``${data.source}`` is a dependency in dvc.yaml),
  the digest changes, and so prepare re-runs.
* An archive (a local ``.zip``/``.tar.gz``, e.g. from ``dvc import-url``, or
  an http(s) URL) is fetched with the benchmark files' machinery (retries,
  backoff, atomic rename, ``data.sha256`` checked), unpacked safely
  (``cnnpipe.data.archive``) into ``data/raw/folder/images/`` and removed.

``data/raw/folder/`` is replaced whole, only when everything worked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnpipe.data.archive import safe_extract
from cnnpipe.data.folder import tree_digest
from cnnpipe.data.registry import FOLDER, RawFile, get_dataset, is_archive_name
from cnnpipe.data.sources import REMOTE_SCHEMES, Source
from cnnpipe.util.errors import DataError
from cnnpipe.util.files import atomic_dir, atomic_write_json
from cnnpipe.util.hashing import sha256_file

MANIFEST = "source.json"
IMAGES = "images"


def is_remote(source: str) -> bool:
    return source.split("://", 1)[0] in REMOTE_SCHEMES


@dataclass(frozen=True)
class FolderSource:
    manifest: dict[str, Any]
    lines: list[str]


def images_root(raw_dir: str | os.PathLike[str], source: str) -> Path:
    """Where prepare reads the images: the unpacked archive, or the user's folder in place."""
    raw = Path(raw_dir)
    if is_remote(source) or is_archive_name(source):
        return raw / IMAGES
    return Path(source)


def _fetch_archive(source: str, dest: Path, sha256: str | None, *, timeout: float, retries: int,
                   backoff: float, progress: bool) -> tuple[Path, str]:
    from cnnpipe.data.download import fetch_file

    if is_remote(source):
        base, _, name = source.split("?", 1)[0].rpartition("/")
        where = Source("upstream", base + "/")
    else:
        path = Path(source)
        if not path.is_file():
            raise DataError(f"data.source {source}: no such archive; check the path (relative to the project root)")
        name, where = path.name, Source("mirror", str(path.resolve().parent))
    raw = RawFile(name=name, role="archive")
    pins = {name: sha256} if sha256 else {}
    fetched = fetch_file(get_dataset(FOLDER), raw, dest, [where], pins=pins, timeout=timeout, retries=retries,
                         backoff=backoff, progress=progress)
    return dest / name, fetched.describe()


def prepare_source(source: str, raw_dir: str | os.PathLike[str], *, sha256: str | None = None,
                   timeout: float = 30.0, retries: int = 3, backoff: float = 1.0, progress: bool = True,
                   echo: Callable[[str], None] | None = print) -> FolderSource:
    """Fetch/unpack an archive source, or fingerprint a folder source; write ``source.json``."""
    lines: list[str] = []
    manifest: dict[str, Any] = {"source": source}
    if not (is_remote(source) or is_archive_name(source)):
        folder = Path(source)
        if not folder.is_dir():
            raise DataError(f"data.source {source}: no such folder; point it at your class-per-folder images "
                            "(relative to the project root) and `dvc add` it")
        digest, count = tree_digest(folder)
        if count == 0:
            raise DataError(f"data.source {source}: the folder is empty; put one sub-folder of images per class in it")
        manifest.update(kind="folder", files=count, tree_sha256=digest)
        lines.append(f"{source}: {count:,} files used in place (tree SHA-256 {digest[:12]})")
        with atomic_dir(raw_dir) as tmp:
            atomic_write_json(Path(tmp) / MANIFEST, manifest)
    else:
        with atomic_dir(raw_dir) as tmp:
            archive, described = _fetch_archive(source, Path(tmp), sha256, timeout=timeout, retries=retries,
                                                backoff=backoff, progress=progress)
            lines.append(described)

            manifest["archive_sha256"] = sha256_file(archive)
            extracted = safe_extract(archive, Path(tmp) / IMAGES)
            archive.unlink()
            digest, count = tree_digest(Path(tmp) / IMAGES)
            manifest.update(kind="archive", files=count, tree_sha256=digest,
                            skipped_links=extracted.skipped_links[:20], skipped_junk=extracted.skipped_junk)
            lines.append(f"unpacked {extracted.files:,} files ({extracted.bytes / 1e6:.1f} MB) into {Path(raw_dir) / IMAGES}")
            if extracted.skipped_links:
                shown = ", ".join(extracted.skipped_links[:3])
                lines.append(f"skipped {len(extracted.skipped_links)} link(s) or special file(s), never created: {shown}")
            if not sha256:
                lines.append(f"unpinned: add `data.sha256: {manifest['archive_sha256']}` to params.yaml to refuse a changed archive")
            atomic_write_json(Path(tmp) / MANIFEST, manifest)
    if echo is not None:
        for line in lines:
            echo(line)
    return FolderSource(manifest, lines)
