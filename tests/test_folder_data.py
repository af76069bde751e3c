"""Class-per-folder datasets (data.dataset: folder): scan, decode, split, dedupe, refuse, unpack, export.

Every tree is generated here as real PNG/JPEG files; archives are served from
127.0.0.1 (the only mock: the network edge).
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from cnnpipe.data.archive import safe_extract
from cnnpipe.data.folder_prepare import REPORT_FILE, prepare_folder
from cnnpipe.data.folder_source import IMAGES, MANIFEST, prepare_source
from cnnpipe.data.prepared import load_split, load_stats
from cnnpipe.util.errors import DataError, ParamsError
from cnnpipe.params.load import parse_params
from fixtures_images import COLORS, image_bytes, make_tree
from fixtures_raw import http_server, no_proxy  # noqa: F401 - fixtures
from project_builder import ROOT

def prep(source: Path, out: Path, **kwargs):  # type: ignore[no-untyped-def]
    settings = dict(image_size=[16, 16], channels=3, val_fraction=0.2, test_fraction=0.2, split_seed=0) | kwargs
    return prepare_folder(source, out, **settings)


def test_one_tree_prepares_sorted_classes_stratified_splits_and_a_report(tmp_path):
    tree = make_tree(tmp_path / "imgs", {"owl": 10, "cat": 10, "dog": 10})
    out = tmp_path / "prepared"
    result = prep(tree, out, val_fraction=0.25)
    stats = load_stats(out)
    assert stats.dataset == "folder" and stats.classes == ["cat", "dog", "owl"]  # sorted folder names
    assert stats.image_shape == [3, 16, 16] and stats.sizes == {"train": 18, "val": 6, "test": 6}
    splits = {name: load_split(out, name) for name in ("train", "val", "test")}
    for split in splits.values():
        counts = np.bincount(split.labels.numpy(), minlength=3)
        assert counts.min() == counts.max()  # stratified
    # colours survive decoding: class c's images are dominated by channel c (cat red, dog green, owl blue)
    means = splits["train"].images.float().mean(dim=(2, 3))
    assert (means.argmax(dim=1) == splits["train"].labels).all()
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["per_class"]["cat"] == {"found": 10, "kept": 10, "skipped": 0, "train": 6, "val": 2, "test": 2}
    again = prep(tree, tmp_path / "again", val_fraction=0.25)
    assert again.stats.files == result.stats.files  # deterministic for a seed


def test_grayscale_and_resize_follow_params(tmp_path):
    tree = make_tree(tmp_path / "imgs", {"cat": 4, "dog": 4})
    stats = prep(tree, tmp_path / "out", image_size=[8, 12], channels=1, val_fraction=0.25, test_fraction=0.25).stats
    assert stats.image_shape == [1, 8, 12]
    assert load_split(tmp_path / "out", "train").images.shape[1:] == (1, 8, 12)


def test_broken_files_are_listed_and_skipped_or_refused_when_strict(tmp_path):
    tree = make_tree(tmp_path / "imgs", {"cat": 6, "dog": 6})
    good = (tree / "cat" / "001.png").read_bytes()
    (tree / "cat" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tree / "dog" / "fake.jpg").write_text("<html>not a picture</html>")
    result = prep(tree, tmp_path / "out", val_fraction=0.25, test_fraction=0.25)
    assert sorted(result.report.skipped) == [("cat/truncated.png", "truncated"), ("dog/fake.jpg", "not an image")]
    assert result.report.per_class["cat"].skipped == 1 and result.report.per_class["cat"].kept == 6
    with pytest.raises(DataError, match=r"2 unreadable image file\(s\) \(cat/truncated.png: truncated, dog/fake.jpg: "
                                        r"not an image\); .*data.strict: false") as err:
        prep(tree, tmp_path / "strict", strict=True)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "strict").exists()  # nothing written


def test_nested_folders_count_for_their_class_and_junk_is_ignored_or_listed(tmp_path):
    tree = make_tree(tmp_path / "imgs", {"cat": 4, "dog": 4})
    (tree / "cat" / "more" / "deeper").mkdir(parents=True)
    (tree / "cat" / "more" / "deeper" / "x.png").write_bytes(image_bytes(COLORS["cat"], seed=99))
    (tree / ".DS_Store").write_bytes(b"\0\1")
    (tree / "dog" / "Thumbs.db").write_bytes(b"\0")
    (tree / "__MACOSX").mkdir()
    (tree / "__MACOSX" / "._001.png").write_bytes(b"\0")
    (tree / "dog" / "notes.txt").write_text("labels by hand")
    (tree / "README.md").write_text("my dataset")
    result = prep(tree, tmp_path / "out", val_fraction=0.25, test_fraction=0.25)
    assert result.stats.classes == ["cat", "dog"]  # __MACOSX is not a class
    assert result.report.per_class["cat"].found == 5
    assert sorted(result.report.non_images) == ["README.md", "dog/notes.txt"]
    assert any("ignored 2 non-image file(s)" in note for note in result.report.notes)
    with pytest.raises(DataError, match=r"2 non-image file\(s\).*data.strict: false"):
        prep(tree, tmp_path / "strict", strict=True)


def test_a_one_image_class_trains_but_is_noted(tmp_path):
    tree = make_tree(tmp_path / "imgs", {"cat": 10, "dog": 10})
    make_tree(tree, {"owl": 1})
    result = prep(tree, tmp_path / "out")
    assert result.report.per_class["owl"].splits == {"train": 1, "val": 0, "test": 0}
    assert "class 'owl' has 1 usable image(s): none in val and test" in result.report.notes


@pytest.mark.parametrize("layout, message", [
    ({"cat": 3}, r"found 1 class folder \(cat\); a classifier needs at least 2"),
    ({}, r"found no class folders"),
])
def test_fewer_than_two_classes_is_refused(tmp_path, layout, message):
    tree = make_tree(tmp_path / "imgs", layout)
    tree.mkdir(exist_ok=True)
    (tree / "stray.png").write_bytes(image_bytes(COLORS["cat"], seed=1))
    with pytest.raises(DataError, match=message):
        prep(tree, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_empty_class_or_an_all_broken_class_is_refused(tmp_path):
    tree = make_tree(tmp_path / "imgs", {"cat": 4, "dog": 4})
    (tree / "owl").mkdir()
    (tree / "owl" / "notes.txt").write_text("todo")
    with pytest.raises(DataError, match=r"class folder 'owl' has no images"):
        prep(tree, tmp_path / "out")
    (tree / "owl" / "a.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"class 'owl' has no readable images \(1 skipped\)"):
        prep(tree, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_given_train_and_test_trees_are_respected_and_duplicates_dropped(tmp_path):
    make_tree(tmp_path / "imgs" / "train", {"cat": 8, "dog": 8})
    make_tree(tmp_path / "imgs" / "test", {"cat": 3, "dog": 3}, start=100)
    leak = tmp_path / "imgs" / "test" / "dog" / "leak.png"
    leak.write_bytes((tmp_path / "imgs" / "train" / "dog" / "001.png").read_bytes())  # a test image that is trained on
    mislabelled = tmp_path / "imgs" / "test" / "cat" / "copy.png"
    mislabelled.write_bytes((tmp_path / "imgs" / "train" / "dog" / "003.png").read_bytes())
    result = prep(tmp_path / "imgs", tmp_path / "out", val_fraction=0.25)
    assert result.stats.sizes == {"train": 12, "val": 4, "test": 6}  # 8 test files - 2 duplicates
    assert result.report.duplicates == {"val": 0, "test": 2} and result.report.dropped == {"val": 0, "test": 2}
    assert result.report.conflicts == 1
    kept = prep(tmp_path / "imgs", tmp_path / "kept", val_fraction=0.25, dedupe=False)
    assert kept.stats.sizes["test"] == 8 and kept.report.duplicates["test"] == 2 and kept.report.dropped["test"] == 0


def test_an_image_above_the_pixel_cap_is_refused_by_name(tmp_path):
    tree = make_tree(tmp_path / "imgs", {"cat": 4, "dog": 4})
    (tree / "dog" / "huge.png").write_bytes(image_bytes(COLORS["dog"], seed=5, size=(300, 200)))
    with pytest.raises(DataError, match=r"dog/huge.png: 300x200 = 60,000 pixels, above data.max_pixels=50,000"):
        prep(tree, tmp_path / "out", max_pixels=50_000)
    assert not (tmp_path / "out").exists()


def test_a_dataset_too_big_for_the_disk_is_refused_before_decoding(tmp_path):
    tree = make_tree(tmp_path / "imgs", {"cat": 4, "dog": 4})
    (tree / "cat" / "000.jpg").write_bytes(b"would fail decoding, but is never decoded")
    with pytest.raises(DataError, match=r"8 images at 3x512x512 need ~0.0 GB of free disk .* but 0.0 GB is free; "
                                         r"free some space, or set a smaller data.image_size, e.g. \[\d+, \d+\]") as err:
        prep(tree, tmp_path / "out", image_size=[512, 512], disk_free=1_000_000)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".prepare-*"))


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _tree_members(prefix: str = "my_images/") -> dict[str, bytes]:
    return {f"{prefix}{cls}/{i}.png": image_bytes(COLORS[cls], seed=i + 7 * len(cls)) for cls in ("cat", "dog") for i in range(4)}


def test_an_archive_from_127_0_0_1_is_verified_unpacked_and_prepared(tmp_path, http_server):
    archive = _zip(http_server.root / "pets.zip", _tree_members() | {"my_images/.DS_Store": b"x"})
    import hashlib

    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    raw = tmp_path / "raw" / "folder"
    done = prepare_source(http_server.url + "pets.zip", raw, sha256=sha, backoff=0.01, progress=False, echo=None)
    assert done.manifest["kind"] == "archive" and done.manifest["archive_sha256"] == sha
    assert sorted(p.name for p in raw.iterdir()) == [IMAGES, MANIFEST]  # the archive itself is not kept
    stats = prep(raw / IMAGES, tmp_path / "out", val_fraction=0.25, test_fraction=0.25).stats
    assert stats.classes == ["cat", "dog"]  # stepped into the my_images/ wrapper
    with pytest.raises(DataError, match=r"could not get pets.zip: .*is not data.sha256's"):
        prepare_source(http_server.url + "pets.zip", tmp_path / "raw2", sha256="0" * 64, backoff=0.01, progress=False, echo=None)
    assert not (tmp_path / "raw2").exists()


def test_an_archive_with_a_parent_path_member_is_refused_and_writes_nothing(tmp_path, http_server):
    _zip(http_server.root / "evil.zip", _tree_members() | {"my_images/../../evil.png": b"payload"})
    raw = tmp_path / "raw" / "folder"
    with pytest.raises(DataError, match=r"evil.zip: member 'my_images/../../evil.png' would land outside the target folder"):
        prepare_source(http_server.url + "evil.zip", raw, backoff=0.01, progress=False, echo=None)
    assert not raw.exists() and not (tmp_path / "evil.png").exists() and not (tmp_path / "raw" / "evil.png").exists()


def test_tar_links_are_never_created_and_absolute_paths_refused(tmp_path):
    path = tmp_path / "links.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in _tree_members("").items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("cat/passwd.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    done = safe_extract(path, tmp_path / "out")
    assert done.files == 8 and done.skipped_links == ["cat/passwd.png"]
    assert not (tmp_path / "out" / "cat" / "passwd.png").exists()
    bad = tmp_path / "abs.tar"
    with tarfile.open(bad, "w") as tar:
        info = tarfile.TarInfo("/tmp/x.png")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DataError, match=r"member '/tmp/x.png' would land outside"):
        safe_extract(bad, tmp_path / "out2")
    with pytest.raises(DataError, match=r"expands beyond 0.0 GB"):
        safe_extract(path, tmp_path / "out3", max_bytes=100)
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()


def test_a_local_folder_source_is_fingerprinted_in_place(tmp_path):
    tree = make_tree(tmp_path / "imgs", {"cat": 2, "dog": 2})
    raw = tmp_path / "raw" / "folder"
    first = prepare_source(str(tree), raw, echo=None).manifest
    assert first["kind"] == "folder" and first["files"] == 4 and sorted(p.name for p in raw.iterdir()) == [MANIFEST]
    (tree / "dog" / "001.png").write_bytes(image_bytes(COLORS["dog"], seed=12345))
    assert prepare_source(str(tree), raw, echo=None).manifest["tree_sha256"] != first["tree_sha256"]
    with pytest.raises(DataError, match=r"data.source .*/nope: no such folder"):
        prepare_source(str(tmp_path / "nope"), tmp_path / "raw2", echo=None)


def _folder_params(**data: object):  # type: ignore[no-untyped-def]
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update({"dataset": "folder", "source": "my_images"} | data)
    return raw


@pytest.mark.parametrize("data, message", [
    ({"source": "src/cnnpipe/data/registry.py"}, "still names the benchmark registry"),
    ({"image_size": [64]}, r"data.image_size must be \[height, width\]"),
    ({"channels": 4}, "data.channels must be 1 or 3"),
    ({"source": "ftp://host/x.zip"}, "unsupported scheme 'ftp'"),
    ({"source": "https://host/x.png"}, "must name a .zip, .tar, .tar.gz or .tgz archive"),
    ({"sha256": "a" * 64}, "data.sha256 pins an archive, but data.source is a folder"),
    ({"test_fraction": 1.0}, "data.test_fraction must be < 1"),
    ({"strict": "yes"}, "data.strict must be true or false"),
])
def test_folder_params_are_checked_in_one_line(data, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(_folder_params(**data))


def test_folder_params_give_the_model_check_the_image_shape():
    params = parse_params(_folder_params(image_size=[32, 48], channels=1))
    assert params.data.spec().image_shape == (1, 32, 48)
    with pytest.raises(ParamsError, match="preset small_bn"):  # its poolings cannot fit a 2x2 image
        parse_params(_folder_params(image_size=[2, 2]))


def test_export_as_folders_round_trips_to_the_same_splits_labels_and_order(tmp_path):
    from cnnpipe.cli.commands import export_images
    from synthetic import make_prepared

    make_prepared(tmp_path / "prepared", n_train=60, n_val=20, n_test=30, shape=(1, 12, 12), num_classes=3)
    written = export_images(str(tmp_path / "prepared"), "all", None, tmp_path / "tree", layout="folders")
    assert len(written) == 110
    assert sorted(p.name for p in (tmp_path / "tree" / "test").iterdir()) == ["0-class0", "1-class1", "2-class2"]
    prep(tmp_path / "tree", tmp_path / "again", image_size=[12, 12], channels=1, dedupe=False)
    for split in ("train", "val", "test"):
        before, after = load_split(tmp_path / "prepared", split), load_split(tmp_path / "again", split)
        assert np.array_equal(before.images.numpy(), after.images.numpy())
        assert np.array_equal(before.labels.numpy(), after.labels.numpy())


def test_a_local_archive_source_is_unpacked_like_a_downloaded_one(tmp_path):
    archive = _zip(tmp_path / "pets.zip", _tree_members())  # e.g. what `dvc import-url URL pets.zip` put there
    raw = tmp_path / "raw" / "folder"
    lines = prepare_source(str(archive), raw, echo=None).lines
    assert any(line.startswith("unpinned: add `data.sha256: ") for line in lines)
    assert sorted(p.relative_to(raw / IMAGES).as_posix() for p in (raw / IMAGES).rglob("*.png"))[:2] == [
        "my_images/cat/0.png", "my_images/cat/1.png"]
    archive.write_bytes(archive.read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match=r"could not get pets.zip: .*truncated or corrupt zip"):
        prepare_source(str(archive), tmp_path / "raw2", echo=None)
    assert archive.exists() and not (tmp_path / "raw2").exists()
