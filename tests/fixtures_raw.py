"""Tiny raw datasets in the exact upstream formats, and a faulty loopback HTTP server.

* ``make_idx_raw``: the four MNIST-family ``*-idx?-ubyte.gz`` files.
* ``make_cifar_raw``: ``cifar-10-python.tar.gz`` holding ``cifar-10-batches-py/``
  ``data_batch_1..5``, ``test_batch`` and ``batches.meta``, pickled the way the
  originals were (Python 2 cPickle, protocol 2: byte-string keys, numpy arrays
  rebuilt through ``numpy.core.multiarray._reconstruct``).
* ``http_server``: a pytest fixture serving a folder on 127.0.0.1 (random
  port, threaded) whose URL prefixes can misbehave: drop the connection
  mid-file, send the wrong length, corrupt bytes, an HTML page with status 200,
  a redirect loop, a stall longer than the client's timeout, an HTTP error.

The network is mocked here and only here: everything downstream is real code.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import socket
import struct
import tarfile
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnpipe.data.formats import idx_bytes
from cnnpipe.data.registry import DatasetSpec, RawFile, get_dataset
from synthetic import make_images

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# --------------------------------------------------------------------------- digests


def gunzip_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a gzip file's decompressed content (what ``data.checksums`` pins)."""
    with gzip.open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def md5(path: str | os.PathLike[str]) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- IDX (MNIST family)


def write_idx_gz(path: str | os.PathLike[str], array: np.ndarray) -> None:
    Path(path).write_bytes(gzip.compress(idx_bytes(array), mtime=0))


@dataclass
class IdxFixture:
    folder: Path
    checksums: dict[str, str]  # file name -> content sha256
    train: tuple[np.ndarray, np.ndarray]  # images N x H x W uint8, labels uint8
    test: tuple[np.ndarray, np.ndarray]


def make_idx_raw(folder: str | os.PathLike[str], *, n_train: int = 200, n_test: int = 50,
                 side: int = 28, num_classes: int = 10, seed: int = 0) -> IdxFixture:
    """Write the four IDX gz files of a tiny MNIST-like dataset into ``folder``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    train_x, train_y = make_images(n_train, (1, side, side), num_classes, seed)
    test_x, test_y = make_images(n_test, (1, side, side), num_classes, seed + 1)
    arrays = {
        "train_images": train_x[:, 0],
        "train_labels": train_y.astype(np.uint8),
        "test_images": test_x[:, 0],
        "test_labels": test_y.astype(np.uint8),
    }
    for role, array in arrays.items():
        write_idx_gz(out / IDX_NAMES[role], array)
    checksums = {name: gunzip_sha256(out / name) for name in IDX_NAMES.values()}
    return IdxFixture(out, checksums, (arrays["train_images"], arrays["train_labels"]),
                      (arrays["test_images"], arrays["test_labels"]))


# --------------------------------------------------------------------------- CIFAR-10 (python)


class Py2Pickler(pickle._Pickler):  # type: ignore[misc,name-defined]
    """Protocol 2 written the way Python 2's cPickle wrote CIFAR-10: strings as BINSTRING."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def py2_pickle(obj: Any) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    # The originals were written by numpy 1.x, which kept _reconstruct in numpy.core.
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


class Evil:
    """A pickle payload that runs a shell command when unpickled by a trusting loader."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


@dataclass
class CifarFixture:
    archive: Path
    checksums: dict[str, str]
    train: tuple[np.ndarray, np.ndarray]  # images N x 3 x 32 x 32 uint8, labels int64
    test: tuple[np.ndarray, np.ndarray]


def _batch(images: np.ndarray, labels: np.ndarray, name: str) -> dict[bytes, Any]:
    return {
        b"batch_label": name.encode(),
        b"labels": [int(v) for v in labels],
        b"data": images.reshape(len(images), -1),
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(images))],
    }


def make_cifar_raw(folder: str | os.PathLike[str], *, per_batch: int = 20, n_test: int = 30, seed: int = 0,
                   meta: bool = True, pickler: str = "py2", evil_command: str | None = None) -> CifarFixture:
    """Write a tiny ``cifar-10-python.tar.gz``; ``evil_command`` plants a malicious data_batch_3."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    dump = py2_pickle if pickler == "py2" else (lambda obj: pickle.dumps(obj, protocol=2))
    train_x, train_y = make_images(per_batch * 5, (3, 32, 32), 10, seed)
    test_x, test_y = make_images(n_test, (3, 32, 32), 10, seed + 1)
    members: dict[str, bytes] = {}
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        batch = _batch(train_x[part], train_y[part], f"training batch {i + 1} of 5")
        if evil_command is not None and i == 2:
            batch[b"data"] = Evil(evil_command)
        members[f"data_batch_{i + 1}"] = dump(batch)
    members["test_batch"] = dump(_batch(test_x, test_y, "testing batch 1 of 1"))
    if meta:
        members["batches.meta"] = dump({b"label_names": [c.encode() for c in CIFAR_CLASSES],
                                        b"num_cases_per_batch": per_batch, b"num_vis": 3072})
    tar_buffer = io.BytesIO()
    with tarfile.open(fileobj=tar_buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        folder_info = tarfile.TarInfo("cifar-10-batches-py")
        folder_info.type = tarfile.DIRTYPE
        folder_info.mode = 0o755
        tar.addfile(folder_info)
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    archive = out / CIFAR_ARCHIVE
    archive.write_bytes(gzip.compress(tar_buffer.getvalue(), mtime=0))
    return CifarFixture(archive, {CIFAR_ARCHIVE: gunzip_sha256(archive)}, (train_x, train_y), (test_x, test_y))


# --------------------------------------------------------------------------- specs


def offline_spec(name: str = "mnist", *, urls: tuple[str, ...] = (), system_dirs: tuple[str, ...] = (),
                 md5s: dict[str, str] | None = None) -> DatasetSpec:
    """The registry's spec with test-controlled sources (never the real network or /usr/share)."""
    spec = get_dataset(name)
    files: tuple[RawFile, ...] = spec.files
    if md5s is not None:
        files = tuple(replace(raw, md5=md5s.get(raw.name, raw.md5)) for raw in files)
    return replace(spec, urls=urls, system_dirs=system_dirs, files=files)


# --------------------------------------------------------------------------- faulty HTTP server

FAULTS = ("drop", "short", "corrupt", "altered", "html", "redirect", "slow", "status")


@dataclass
class Fault:
    mode: str
    times: int | None = None  # misbehave this many times, then serve normally; None: always
    status: int = 500
    delay: float = 5.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = root
        self.faults: dict[str, Fault] = {}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def handle_error(self, request: Any, client_address: Any) -> None:  # clients hanging up is expected
        pass


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    def _fault(self) -> Fault | None:
        with self.server.lock:
            self.server.hits[self.path] += 1
            for prefix, fault in sorted(self.server.faults.items(), key=lambda kv: -len(kv[0])):
                if self.path.startswith(prefix):
                    if fault.times is None:
                        return fault
                    if fault.times > 0:
                        fault.times -= 1
                        return fault
                    return None
        return None

    def _send(self, body: bytes, *, length: int | None = None, status: int = 200,
              content_type: str = "application/octet-stream") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        fault = self._fault()
        if fault is not None and fault.mode == "redirect":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault is not None and fault.mode == "status":
            self._send(f"error {fault.status}".encode(), status=fault.status, content_type="text/plain")
            return
        if fault is not None and fault.mode == "slow":
            self.server.stopping.wait(fault.delay)
        file = self.server.root / self.path.rsplit("/", 1)[-1].split("?")[0]
        if not file.is_file():
            self._send(b"not found", status=404, content_type="text/plain")
            return
        body = file.read_bytes()
        if fault is None or fault.mode == "slow":
            self._send(body)
        elif fault.mode == "drop":
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        elif fault.mode == "short":  # the headers lie: a complete-looking but truncated response
            self._send(body[: len(body) // 2], length=len(body) // 2)
        elif fault.mode == "corrupt":
            damaged = bytearray(body)
            for i in range(len(damaged) // 3, len(damaged) // 3 + 64):
                damaged[i % len(damaged)] ^= 0xA5
            self._send(bytes(damaged))
        elif fault.mode == "altered":  # a valid gzip of different content: only a checksum can tell
            content = bytearray(gzip.decompress(body))
            content[-1] ^= 0x01
            self._send(gzip.compress(bytes(content), mtime=0))
        elif fault.mode == "html":
            page = b"<!DOCTYPE html><html><head><title>Oops</title></head><body>Service unavailable</body></html>"
            self._send(page, content_type="text/html")
        else:
            raise AssertionError(f"unknown fault {fault.mode}")


@dataclass
class FaultyServer:
    """A loopback server for ``root``: any URL path serves ``root/<last path component>``."""

    root: Path
    url: str
    _server: _Server = field(repr=False)

    def fault(self, prefix: str, mode: str, *, times: int | None = None, status: int = 500,
              delay: float = 5.0) -> str:
        """Make URLs under ``/<prefix>/`` misbehave; returns that base URL."""
        if mode not in FAULTS:
            raise ValueError(f"mode must be one of {FAULTS}")
        path = "/" + prefix.strip("/") + "/"
        self._server.faults[path] = Fault(mode, times, status, delay)
        return self.url + prefix.strip("/") + "/"

    def hits(self, name: str, prefix: str = "") -> int:
        """How many GETs asked for ``name`` (under ``/<prefix>/`` when given)."""
        wanted = "/" + (prefix.strip("/") + "/" if prefix else "")
        return sum(n for path, n in self._server.hits.items() if path.startswith(wanted) and path.endswith("/" + name))

    @property
    def total_hits(self) -> int:
        return sum(self._server.hits.values())


def serve(root: Path) -> Iterator[FaultyServer]:
    """Serve ``root`` until the generator is closed."""
    server = _Server(root)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    try:
        yield FaultyServer(root, f"http://{host}:{port}/", server)
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback requests must not go through a proxy from the environment."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def http_server(tmp_path: Path, no_proxy: None) -> Iterator[FaultyServer]:
    """A faulty loopback server over ``tmp_path / 'www'`` (fill it with ``make_*_raw``)."""
    root = tmp_path / "www"
    root.mkdir()
    yield from serve(root)
