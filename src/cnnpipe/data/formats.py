"""Upstream raw formats: IDX (the MNIST family) and CIFAR-10's python tar.gz.

Two jobs share the format knowledge here:

* ``inspect_raw`` streams a downloaded file once to get its archive MD5, the
  SHA-256 of its decompressed content and a format check, so a truncated file
  or an HTML error page is refused even when no checksum is known;
* ``load_idx`` / ``read_cifar_archive`` decode files for the prepare stage
  (``load_idx`` also returns the content digest that ``stats.json`` records).

CIFAR-10 batches are Python pickles. They are loaded with a restricted
unpickler that can rebuild numpy arrays and nothing else: a tampered batch that
asks to import ``os.system`` is refused before anything runs.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from cnnpipe.util.errors import DataError

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"

# IDX type codes (big-endian) -> numpy dtype.
IDX_DTYPES: dict[int, str] = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

CIFAR_DIR = "cifar-10-batches-py"
CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = "test_batch"
CIFAR_META = "batches.meta"
CIFAR_SIDE = 32


class RawFormatError(DataError):
    """A raw file is not what its name promises. ``truncated`` marks a short file (worth a retry)."""

    def __init__(self, reason: str, *, truncated: bool = False) -> None:
        self.reason = reason
        self.truncated = truncated
        super().__init__(reason)


@dataclass(frozen=True)
class RawCheck:
    """What one pass over a raw file found."""

    md5: str  # of the file as stored (the archive)
    content_sha256: str  # of the gunzipped bytes: survives re-compression by a mirror
    detail: str  # human summary, e.g. "IDX uint8 60000 x 28 x 28"


class _Hashing:
    """A read-only stream wrapper that hashes everything read through it."""

    def __init__(self, stream: IO[bytes] | Any, digest: Any) -> None:
        self.stream = stream
        self.digest = digest

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.digest.update(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> int:
        total = 0
        while data := self.read(CHUNK):
            total += len(data)
        return total


# --------------------------------------------------------------------------- gzip errors


def _gzip_reason(err: Exception, head: bytes) -> RawFormatError:
    """Translate what gzip/zlib raised into a short reason."""
    if isinstance(err, EOFError):
        return RawFormatError("truncated: the gzip stream ends early", truncated=True)
    text = str(err)
    if isinstance(err, gzip.BadGzipFile) and "Not a gzipped file" in text:
        stripped = head.lstrip().lower()
        if stripped.startswith((b"<!doctype", b"<html", b"<?xml", b"<")):
            return RawFormatError("HTML page instead of a gzip file (an error page served with status 200?)")
        if not head:
            return RawFormatError("empty file", truncated=True)
        return RawFormatError(f"not a gzip file (starts with {head[:8]!r})")
    if isinstance(err, gzip.BadGzipFile) and ("CRC" in text or "Incorrect length" in text):
        return RawFormatError("corrupt: gzip CRC/length check failed")
    if isinstance(err, zlib.error):
        return RawFormatError(f"corrupt: bad compressed data ({text})")
    return RawFormatError(f"corrupt: {text}")


def _head(path: Path, size: int = 64) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(size)


# --------------------------------------------------------------------------- IDX


def _idx_header(head: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """Parse an IDX header: dtype, dims and header length. Raises RawFormatError."""
    if len(head) < 4:
        raise RawFormatError("truncated: shorter than an IDX header", truncated=True)
    if head[0] != 0 or head[1] != 0 or head[2] not in IDX_DTYPES or head[3] == 0:
        raise RawFormatError(f"not an IDX file (magic {head[:4].hex()})")
    ndim = head[3]
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        raise RawFormatError("truncated: the IDX header is incomplete", truncated=True)
    dims = tuple(int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.dtype(IDX_DTYPES[head[2]]), dims, header_len


def _idx_expected_bytes(dtype: np.dtype, dims: tuple[int, ...], header_len: int) -> int:
    return header_len + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize


def parse_idx(data: bytes | bytearray | memoryview, where: str = "IDX data") -> np.ndarray:
    """Decode uncompressed IDX bytes; check magic, dims and length."""
    try:
        dtype, dims, header_len = _idx_header(bytes(data[:4 + 4 * 255]))
    except RawFormatError as err:
        raise DataError(f"{where}: {err.reason}; delete it and re-run the download stage") from None
    expected = _idx_expected_bytes(dtype, dims, header_len)
    shape = " x ".join(map(str, dims))
    if len(data) < expected:
        raise DataError(
            f"{where}: truncated: the header says {shape} ({expected} bytes) but it holds {len(data)}; "
            "delete it and re-run the download stage"
        )
    if len(data) > expected:
        raise DataError(f"{where}: {len(data) - expected} unexpected bytes after the {shape} IDX data; delete it and re-run the download stage")
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False) if dtype.itemsize > 1 else array


def load_idx(path: str | os.PathLike[str]) -> tuple[np.ndarray, str]:
    """An IDX file (gzipped or raw) as an array of its header's shape and type, and the SHA-256 of the IDX bytes."""
    source = Path(path)
    try:
        head = _head(source)
    except FileNotFoundError:
        raise DataError(f"{source} is missing; run the download stage (dvc repro download)") from None
    try:
        if head.startswith(GZIP_MAGIC):
            with gzip.open(source, "rb") as handle:
                data = bytearray(handle.read())
        else:
            data = bytearray(source.read_bytes())
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{source}: {_gzip_reason(err, head).reason}; delete it and re-run the download stage") from None
    array = parse_idx(data, str(source))
    return array, hashlib.sha256(data).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as IDX (the inverse of ``parse_idx``), e.g. for fixtures and mirrors."""
    codes = {np.dtype(v).newbyteorder("="): k for k, v in IDX_DTYPES.items()}
    native = np.dtype(array.dtype).newbyteorder("=")
    if native not in codes:
        raise ValueError(f"IDX cannot hold dtype {array.dtype}")
    code = codes[native]
    header = bytes([0, 0, code, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()


def _inspect_idx(path: Path, role: str, image_shape: tuple[int, ...] | None) -> RawCheck:
    md5, sha = hashlib.md5(), hashlib.sha256()
    head = _head(path)
    with open(path, "rb") as handle:
        raw = _Hashing(handle, md5)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:  # type: ignore[arg-type]
                content = _Hashing(gz, sha)
                header = content.read(4)
                if len(header) == 4 and header[:2] == b"\0\0":
                    header += content.read(4 * header[3])
                dtype, dims, header_len = _idx_header(header)
                body = content.drain()
        except (OSError, EOFError, zlib.error) as err:
            raise _gzip_reason(err, head) from None
        raw.drain()
    expected = _idx_expected_bytes(dtype, dims, header_len)
    got = header_len + body
    shape = " x ".join(map(str, dims))
    if got < expected:
        raise RawFormatError(f"truncated: the IDX header says {shape} but the data stops short", truncated=True)
    if got > expected:
        raise RawFormatError(f"corrupt: {got - expected} extra bytes after the {shape} IDX data")
    if role.endswith("_images"):
        if len(dims) != 3 or (image_shape is not None and tuple(dims[1:]) != tuple(image_shape[-2:])):
            want = "N x " + " x ".join(map(str, image_shape[-2:])) if image_shape else "N x H x W"
            raise RawFormatError(f"wrong IDX shape {shape} for {role.replace('_', ' ')} (expected {want})")
    elif role.endswith("_labels") and len(dims) != 1:
        raise RawFormatError(f"wrong IDX shape {shape} for {role.replace('_', ' ')} (expected N)")
    return RawCheck(md5.hexdigest(), sha.hexdigest(), f"IDX {np.dtype(dtype).name} {shape}")


# --------------------------------------------------------------------------- CIFAR-10 (python)


def _cifar_member(name: str) -> str | None:
    """Base name of a wanted archive member (``cifar-10-batches-py/<x>``), else None."""
    folder, _, base = name.rpartition("/")
    if folder.rstrip("/").endswith(CIFAR_DIR) and base in (*CIFAR_TRAIN, CIFAR_TEST, CIFAR_META):
        return base
    return None


def _scan_cifar(path: Path, keep: bool) -> tuple[str, str, dict[str, bytes], set[str]]:
    """One streaming pass: MD5, content SHA-256, member bytes (if ``keep``) and names found."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    head = _head(path)
    members: dict[str, bytes] = {}
    found: set[str] = set()
    with open(path, "rb") as handle:
        raw = _Hashing(handle, md5)
        try:
            with gzip.GzipFile(fileobj=raw, mode="rb") as gz:  # type: ignore[arg-type]
                content = _Hashing(gz, sha)
                try:
                    with tarfile.open(fileobj=content, mode="r|") as tar:  # type: ignore[call-overload]
                        for member in tar:
                            base = _cifar_member(member.name)
                            if base is None or not member.isfile():
                                continue
                            extracted = tar.extractfile(member)
                            data = extracted.read() if extracted else b""
                            if len(data) != member.size:
                                raise RawFormatError(f"truncated: {member.name} is cut short", truncated=True)
                            found.add(base)
                            if keep:
                                members[base] = data
                except tarfile.ReadError as err:
                    text = str(err)
                    if "unexpected end" in text or "empty" in text:
                        raise RawFormatError("truncated: the tar archive ends early", truncated=True) from None
                    raise RawFormatError(f"not a tar archive ({text})") from None
                content.drain()
        except (OSError, EOFError, zlib.error) as err:
            raise _gzip_reason(err, head) from None
        raw.drain()
    return md5.hexdigest(), sha.hexdigest(), members, found


def _check_cifar_members(found: set[str]) -> None:
    missing = [name for name in (*CIFAR_TRAIN, CIFAR_TEST) if name not in found]
    if missing:
        raise RawFormatError(f"not the CIFAR-10 python archive: it lacks {CIFAR_DIR}/{missing[0]}")


def _inspect_cifar(path: Path) -> RawCheck:
    md5, sha, _, found = _scan_cifar(path, keep=False)
    _check_cifar_members(found)
    extra = " + batches.meta" if CIFAR_META in found else ""
    return RawCheck(md5, sha, f"CIFAR-10 tar.gz: 5 train batches + test batch{extra}")


def _inspect_image_archive(path: Path) -> RawCheck:
    """A .zip/.tar(.gz) of images: hashes of the file as stored, and a read of every member (CRC, truncation)."""
    import zipfile

    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            md5.update(chunk)
            sha.update(chunk)
    head = _head(path)
    if head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml")):
        raise RawFormatError("HTML page instead of an archive (an error page served with status 200?)")
    if not head:
        raise RawFormatError("empty file", truncated=True)
    name = path.name.lower()
    try:
        if head.startswith(b"PK"):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
                count = len(archive.infolist())
            if bad is not None:
                raise RawFormatError(f"corrupt: zip member {bad} fails its CRC check")
            detail = f"zip of {count} members"
        else:
            count = 0
            with tarfile.open(path, mode="r:*") as archive:
                for _ in archive:
                    count += 1
            detail = f"tar of {count} members"
    except zipfile.BadZipFile as err:
        raise RawFormatError(f"truncated or corrupt zip ({err})", truncated=True) from None
    except (tarfile.ReadError, EOFError, zlib.error, OSError) as err:
        text = str(err)
        truncated = "unexpected end" in text or isinstance(err, EOFError) or "compressed file ended" in text
        if name.endswith(".zip") and not truncated:
            raise RawFormatError(f"not a zip file (starts with {head[:8]!r})") from None
        raise RawFormatError(f"{'truncated' if truncated else 'not a readable tar archive'} ({text})", truncated=truncated) from None
    return RawCheck(md5.hexdigest(), sha.hexdigest(), detail)


def inspect_raw(
    path: str | os.PathLike[str],
    *,
    fmt: str,
    role: str,
    image_shape: tuple[int, ...] | None = None,
) -> RawCheck:
    """Hash and format-check one raw file in a single streaming pass.

    Raises ``RawFormatError`` (one short reason, ``truncated`` set when a
    retry may help) for anything that is not a complete file of ``fmt``.
    """
    source = Path(path)
    if fmt == "idx-gz":
        return _inspect_idx(source, role, image_shape)
    if fmt == "cifar-python":
        return _inspect_cifar(source)
    if fmt == "image-folder":
        return _inspect_image_archive(source)
    raise ValueError(f"unknown raw format {fmt!r}")


# --------------------------------------------------------------------------- restricted unpickling


def _reconstruct_function() -> Callable[..., Any]:
    """numpy's array-rebuild function, wherever this numpy version keeps it."""
    return np.zeros(0).__reduce__()[0]  # type: ignore[index,return-value]


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """What Python 3 protocol-2 pickles call to rebuild ``bytes`` (only latin-1 is allowed)."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1", errors)


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct_function(),
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct_function(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


# Hand-written, not torchvision.datasets.CIFAR10: its loader calls plain pickle.load (runs any pickled code).
class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, strings, numbers and numpy arrays; refuses every other import."""

    def __init__(self, stream: IO[bytes], where: str) -> None:
        super().__init__(stream, encoding="bytes")
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(
                f"refusing to load {self.where}: it asks to import {module}.{name}, which a CIFAR batch never needs "
                "(only numpy arrays are allowed); the archive is tampered or foreign, re-download it from a trusted source"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"refusing to load {self.where}: it uses persistent ids, which a CIFAR batch never does")


def safe_unpickle(data: bytes, where: str) -> Any:
    """Unpickle ``data`` with ``RestrictedUnpickler`` (``encoding='bytes'``, like the Python 2 originals)."""
    try:
        return RestrictedUnpickler(io.BytesIO(data), where).load()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure of a foreign pickle is a corrupt file
        raise DataError(f"{where} is not a readable pickle ({type(err).__name__}: {err}); re-download it") from None


def _key(obj: dict[Any, Any], name: str) -> Any:
    """``obj[b'name']`` (Python 2 originals) or ``obj['name']`` (files written by Python 3)."""
    if name.encode() in obj:
        return obj[name.encode()]
    return obj.get(name)


def _decode_batch(obj: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(obj, dict):
        raise DataError(f"{where} is not a CIFAR batch (a {type(obj).__name__}, not a dict); re-download it")
    data, labels = _key(obj, "data"), _key(obj, "labels")
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"{where} lacks 'data' (a numpy array) or 'labels'; re-download it")
    pixels = CIFAR_SIDE * CIFAR_SIDE * 3
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        raise DataError(f"{where}: 'data' is {data.dtype} {data.shape}, expected uint8 N x {pixels}; re-download it")
    try:
        label_array = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: 'labels' are not integers; re-download it") from None
    if label_array.shape != (data.shape[0],):
        raise DataError(f"{where}: {data.shape[0]} images but {label_array.size} labels; re-download it")
    images = data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE)  # rows are R plane, G plane, B plane
    return np.ascontiguousarray(images), label_array


@dataclass(frozen=True)
class CifarData:
    train_images: np.ndarray  # uint8 N x 3 x 32 x 32
    train_labels: np.ndarray  # int64 N
    test_images: np.ndarray
    test_labels: np.ndarray
    label_names: list[str] | None  # from batches.meta when present
    content_sha256: str  # of the decompressed tar


def read_cifar_archive(path: str | os.PathLike[str]) -> CifarData:
    """Read CIFAR-10's ``cifar-10-python.tar.gz`` without executing pickled code."""
    source = Path(path)
    if not source.is_file():
        raise DataError(f"{source} is missing; run the download stage (dvc repro download)")
    try:
        _, sha, members, found = _scan_cifar(source, keep=True)
        _check_cifar_members(found)
    except RawFormatError as err:
        raise DataError(f"{source}: {err.reason}; delete it and re-run the download stage") from None
    batches = {}
    for name in (*CIFAR_TRAIN, CIFAR_TEST):
        where = f"{CIFAR_DIR}/{name} in {source.name}"
        batches[name] = _decode_batch(safe_unpickle(members[name], where), where)
    label_names = None
    if CIFAR_META in members:
        where = f"{CIFAR_DIR}/{CIFAR_META} in {source.name}"
        meta = safe_unpickle(members[CIFAR_META], where)
        names = _key(meta, "label_names") if isinstance(meta, dict) else None
        if isinstance(names, list) and all(isinstance(n, (bytes, str)) for n in names):
            label_names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
    train_images = np.concatenate([batches[n][0] for n in CIFAR_TRAIN])
    train_labels = np.concatenate([batches[n][1] for n in CIFAR_TRAIN])
    test_images, test_labels = batches[CIFAR_TEST]
    return CifarData(train_images, train_labels, test_images, test_labels, label_names, sha)
