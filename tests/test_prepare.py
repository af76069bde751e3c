"""The prepare stage: decode raw files, stratified seeded val split, prepared folder, sample grid."""

from __future__ import annotations

import numpy as np
import pytest

from cnnpipe.data.prepare import load_raw, prepare_dataset, stratified_split
from cnnpipe.data.prepared import channel_stats, load_split
from cnnpipe.data.registry import get_dataset
from cnnpipe.util.errors import DataError
from fixtures_raw import IDX_NAMES, make_cifar_raw, make_idx_raw


@pytest.fixture
def raw_mnist(tmp_path):
    return make_idx_raw(tmp_path / "raw" / "mnist", n_train=300, n_test=50)


def _prepare(raw_dir, out, seed=0, fraction=0.1, samples=None, name="mnist"):
    return prepare_dataset(get_dataset(name), raw_dir, out, val_fraction=fraction, split_seed=seed, samples_path=samples)


def _rows(images) -> set[bytes]:
    return {bytes(row) for row in images.numpy().reshape(len(images), -1)}


def test_split_sizes_stratification_and_no_overlap(tmp_path, raw_mnist):
    out = tmp_path / "prepared"
    stats = _prepare(raw_mnist.folder, out).stats
    assert stats.sizes == {"train": 270, "val": 30, "test": 50}
    assert stats.dataset == "mnist" and stats.classes == [str(d) for d in range(10)]
    train, val, test = (load_split(out, s) for s in ("train", "val", "test"))
    # stratified: each of the 10 balanced classes (30 images) gives exactly 3 to val
    assert np.bincount(val.labels.numpy(), minlength=10).tolist() == [3] * 10
    assert np.bincount(train.labels.numpy(), minlength=10).tolist() == [27] * 10
    assert not _rows(train.images) & _rows(val.images)
    assert _rows(train.images) | _rows(val.images) == _rows(_as_tensor(raw_mnist.train[0]))
    np.testing.assert_array_equal(test.images.numpy()[:, 0], raw_mnist.test[0])  # test set untouched
    assert set(stats.sources) == set(IDX_NAMES.values())
    assert stats.sources == raw_mnist.checksums


def test_mean_std_come_from_the_train_split_only(tmp_path, raw_mnist):
    out = tmp_path / "prepared"
    stats = _prepare(raw_mnist.folder, out).stats
    train = load_split(out, "train").images.numpy()
    mean, std = channel_stats(train)
    assert stats.mean == pytest.approx(mean) and stats.std == pytest.approx(std)
    everything = np.concatenate([train, load_split(out, "val").images.numpy()])
    assert stats.mean != pytest.approx(channel_stats(everything)[0], abs=1e-9)
    assert stats.mean[0] == pytest.approx(train.astype(np.float64).mean() / 255)
    assert stats.std[0] == pytest.approx(train.astype(np.float64).std() / 255)


def test_same_seed_same_split_other_seed_other_split(tmp_path, raw_mnist):
    a = _prepare(raw_mnist.folder, tmp_path / "a", seed=3).stats
    b = _prepare(raw_mnist.folder, tmp_path / "b", seed=3).stats
    c = _prepare(raw_mnist.folder, tmp_path / "c", seed=4).stats
    assert a.files == b.files and a.fingerprint == b.fingerprint  # byte-identical outputs
    assert a.files["val.safetensors"] != c.files["val.safetensors"]
    assert a.files["test.safetensors"] == c.files["test.safetensors"]


def test_prepare_swaps_the_folder_whole_and_writes_samples(tmp_path, raw_mnist):
    out = tmp_path / "prepared"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    samples = tmp_path / "reports" / "samples.png"
    _prepare(raw_mnist.folder, out, samples=samples)
    assert sorted(p.name for p in out.iterdir()) == ["stats.json", "test.safetensors", "train.safetensors", "val.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared", "raw", "reports"]  # no temp folders left
    assert samples.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(samples) as image:
        width, height = image.size
    assert width > 400 and height > 600  # 10 labelled rows of 8 images


def test_cifar_prepare_uses_meta_label_names(tmp_path):
    fixture = make_cifar_raw(tmp_path / "raw", per_batch=20, n_test=10)
    stats = _prepare(tmp_path / "raw", tmp_path / "prepared", name="cifar10", samples=tmp_path / "s.png").stats
    assert stats.sizes == {"train": 90, "val": 10, "test": 10}
    assert stats.image_shape == [3, 32, 32] and len(stats.mean) == 3
    assert stats.classes[0] == "airplane" and stats.sources == fixture.checksums
    train = load_split(tmp_path / "prepared", "train")
    assert train.images.shape[1:] == (3, 32, 32)


def test_missing_raw_files_name_the_download_stage(tmp_path):
    (tmp_path / "raw").mkdir()
    with pytest.raises(DataError, match=r"missing; run the download stage first \(dvc repro download\)"):
        load_raw(get_dataset("mnist"), tmp_path / "raw")
    assert not (tmp_path / "prepared").exists()


def test_raw_files_of_another_shape_are_refused(tmp_path):
    fixture = make_idx_raw(tmp_path / "raw", n_train=20, n_test=10, side=32)
    with pytest.raises(DataError, match="is data.dataset right"):
        load_raw(get_dataset("mnist"), fixture.folder)


def test_stratified_split_counts_are_exact_for_unbalanced_classes():
    labels = np.repeat(np.arange(4), [50, 31, 7, 12])  # 100 images
    train, val = stratified_split(labels, 0.25, seed=0)
    assert len(val) == 25 and len(train) == 75
    assert not set(train) & set(val) and sorted([*train, *val]) == list(range(100))
    per_class = np.bincount(labels[val], minlength=4)
    # quotas 12.5, 7.75, 1.75, 3.0 -> floors 12, 7, 1, 3 (23); the 2 left go to the largest remainders
    assert per_class.tolist() == [12, 8, 2, 3]
    assert (np.bincount(labels[train], minlength=4) > 0).all()
    np.testing.assert_array_equal(stratified_split(labels, 0.25, seed=0)[1], val)
    assert not np.array_equal(stratified_split(labels, 0.25, seed=1)[1], val)


def test_fashion_mnist_sized_split_is_exact():
    labels = np.repeat(np.arange(10), 6000)
    train, val = stratified_split(labels, 0.1, seed=0)
    assert len(train) == 54000 and len(val) == 6000
    assert np.bincount(labels[val]).tolist() == [600] * 10


def _as_tensor(images: np.ndarray):
    import torch

    return torch.from_numpy(images[:, None])


def test_numpy_images_equal_the_tensor_split_and_are_verified(tmp_path) -> None:
    """The plots stage reads test images without torch: same pixels, same refusal of a changed file."""
    import numpy as np
    import pytest as _pytest

    from cnnpipe.data.prepared import load_images_numpy, load_split
    from cnnpipe.util.errors import DataError
    from synthetic import make_prepared

    folder = tmp_path / "prepared"
    make_prepared(folder, n_train=30, n_val=10, n_test=12)
    images = load_images_numpy(folder, "test")
    assert images.dtype == np.uint8 and images.shape == (12, 1, 28, 28)
    np.testing.assert_array_equal(images, load_split(folder, "test").images.numpy())
    path = folder / "test.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with _pytest.raises(DataError, match="does not match stats.json"):
        load_images_numpy(folder, "test")
