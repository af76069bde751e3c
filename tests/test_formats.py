"""Raw format readers: IDX and CIFAR-10's pickled batches (without running pickled code)."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile

import numpy as np
import pytest

from cnnpipe.data.formats import RawFormatError, idx_bytes, inspect_raw, load_idx, read_cifar_archive
from cnnpipe.util.errors import DataError
from fixtures_raw import CIFAR_CLASSES, gunzip_sha256, make_cifar_raw, make_idx_raw, write_idx_gz


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
def test_idx_round_trip_gz_and_raw(tmp_path, dtype):
    array = (np.arange(2 * 3 * 4) - 5).astype(dtype).reshape(2, 3, 4)
    write_idx_gz(tmp_path / "a.gz", array)
    (tmp_path / "a.idx").write_bytes(idx_bytes(array))
    for path in (tmp_path / "a.gz", tmp_path / "a.idx"):
        back, _ = load_idx(path)
        assert back.shape == (2, 3, 4) and back.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(back, array)


def test_idx_header_is_what_upstream_writes(tmp_path):
    labels = np.array([7, 2, 1], dtype=np.uint8)
    assert idx_bytes(labels) == b"\x00\x00\x08\x01\x00\x00\x00\x03\x07\x02\x01"
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    assert idx_bytes(images)[:16] == bytes.fromhex("00000803" "00000002" "0000001c" "0000001c")


def test_load_idx_digest_is_of_the_uncompressed_bytes(tmp_path):
    fixture = make_idx_raw(tmp_path, n_train=20, n_test=10)
    for name, sha in fixture.checksums.items():
        _, digest = load_idx(tmp_path / name)
        assert digest == sha


def test_truncated_idx_is_refused(tmp_path):
    data = idx_bytes(np.zeros((10, 28, 28), dtype=np.uint8))
    (tmp_path / "short.gz").write_bytes(gzip.compress(data[:-100]))  # a valid gzip of too few bytes
    with pytest.raises(DataError, match="truncated: the header says 10 x 28 x 28"):
        load_idx(tmp_path / "short.gz")
    with pytest.raises(RawFormatError) as err:
        inspect_raw(tmp_path / "short.gz", fmt="idx-gz", role="train_images", image_shape=(1, 28, 28))
    assert err.value.truncated


def test_cut_gzip_file_is_refused(tmp_path):
    blob = gzip.compress(idx_bytes(np.arange(5000, dtype=np.uint8).reshape(50, 10, 10) % 7))
    (tmp_path / "cut.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="truncated"):
        load_idx(tmp_path / "cut.gz")
    with pytest.raises(RawFormatError) as err:
        inspect_raw(tmp_path / "cut.gz", fmt="idx-gz", role="train_labels")
    assert err.value.truncated


def test_not_idx_and_wrong_shape_are_refused(tmp_path):
    (tmp_path / "junk.gz").write_bytes(gzip.compress(b"PK\x03\x04 this is a zip"))
    with pytest.raises(DataError, match="not an IDX file"):
        load_idx(tmp_path / "junk.gz")
    write_idx_gz(tmp_path / "img.gz", np.zeros((3, 32, 32), dtype=np.uint8))
    with pytest.raises(RawFormatError, match="wrong IDX shape 3 x 32 x 32 for train images"):
        inspect_raw(tmp_path / "img.gz", fmt="idx-gz", role="train_images", image_shape=(1, 28, 28))
    (tmp_path / "page.gz").write_bytes(b"<!DOCTYPE html><html>404</html>")
    with pytest.raises(RawFormatError, match="HTML page") as err:
        inspect_raw(tmp_path / "page.gz", fmt="idx-gz", role="train_images")
    assert not err.value.truncated


def test_inspect_hashes_archive_and_content(tmp_path):
    fixture = make_idx_raw(tmp_path, n_train=20, n_test=10)
    name = "train-images-idx3-ubyte.gz"
    check = inspect_raw(tmp_path / name, fmt="idx-gz", role="train_images", image_shape=(1, 28, 28))
    assert check.md5 == hashlib.md5((tmp_path / name).read_bytes()).hexdigest()
    assert check.content_sha256 == fixture.checksums[name]
    assert check.detail == "IDX uint8 20 x 28 x 28"


def test_cifar_archive_parses_like_upstream(tmp_path):
    fixture = make_cifar_raw(tmp_path, per_batch=12, n_test=7)
    assert b"cnumpy.core.multiarray\n_reconstruct" in _member(fixture.archive, "data_batch_1")  # as the originals
    data = read_cifar_archive(fixture.archive)
    assert data.train_images.shape == (60, 3, 32, 32) and data.train_images.dtype == np.uint8
    assert data.train_labels.dtype == np.int64 and data.test_labels.shape == (7,)
    np.testing.assert_array_equal(data.train_images, fixture.train[0])
    np.testing.assert_array_equal(data.train_labels, fixture.train[1])
    np.testing.assert_array_equal(data.test_images, fixture.test[0])
    assert data.label_names == CIFAR_CLASSES
    assert data.content_sha256 == gunzip_sha256(fixture.archive)
    check = inspect_raw(fixture.archive, fmt="cifar-python", role="archive")
    assert check.content_sha256 == data.content_sha256 and "batches.meta" in check.detail


def test_cifar_written_by_python3_and_without_meta(tmp_path):
    fixture = make_cifar_raw(tmp_path, per_batch=4, n_test=3, pickler="py3", meta=False)
    assert b"c_codecs\nencode" in _member(fixture.archive, "data_batch_1")
    data = read_cifar_archive(fixture.archive)
    np.testing.assert_array_equal(data.train_images, fixture.train[0])
    assert data.label_names is None


def test_malicious_cifar_batch_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    fixture = make_cifar_raw(tmp_path / "raw", per_batch=4, n_test=3, evil_command=f"touch {marker}")
    with pytest.raises(DataError) as err:
        read_cifar_archive(fixture.archive)
    message = str(err.value)
    assert "refusing to load cifar-10-batches-py/data_batch_3 in cifar-10-python.tar.gz" in message
    assert "it asks to import posix.system" in message or "it asks to import os.system" in message
    assert not marker.exists()
    # The payload is real: a trusting loader runs the command (harmless here: it touches a file).
    pickle.loads(_member(fixture.archive, "data_batch_3"), encoding="bytes")
    assert marker.exists()


def test_cifar_archive_missing_a_batch_is_refused(tmp_path):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "c.tar.gz").write_bytes(gzip.compress(buffer.getvalue()))
    with pytest.raises(RawFormatError, match="lacks cifar-10-batches-py/data_batch_2"):
        inspect_raw(tmp_path / "c.tar.gz", fmt="cifar-python", role="archive")
    with pytest.raises(DataError, match="lacks"):
        read_cifar_archive(tmp_path / "c.tar.gz")


def test_truncated_cifar_archive_is_refused(tmp_path):
    fixture = make_cifar_raw(tmp_path, per_batch=4, n_test=3)
    blob = fixture.archive.read_bytes()
    fixture.archive.write_bytes(blob[: len(blob) * 2 // 3])
    with pytest.raises(RawFormatError) as err:
        inspect_raw(fixture.archive, fmt="cifar-python", role="archive")
    assert err.value.truncated


def _member(archive, name: str) -> bytes:
    with tarfile.open(archive, "r:gz") as tar:
        handle = tar.extractfile(f"cifar-10-batches-py/{name}")
        assert handle is not None
        return handle.read()
