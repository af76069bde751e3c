"""The download stage's fetch/verify/fallback rules, against a faulty loopback server."""

from __future__ import annotations

from pathlib import Path

import pytest

from cnnpipe.data.download import download_dataset
from cnnpipe.data.registry import get_dataset
from cnnpipe.data.sources import Source, mirror_source, sources_for
from cnnpipe.util.errors import DataError
from fixtures_raw import (  # noqa: F401 - pytest fixtures
    CIFAR_ARCHIVE,
    IDX_NAMES,
    FaultyServer,
    http_server,
    make_cifar_raw,
    make_idx_raw,
    md5,
    no_proxy,
    offline_spec,
)

FAST = {"timeout": 2.0, "retries": 2, "backoff": 0.01, "progress": False}
TRAIN_IMAGES = IDX_NAMES["train_images"]


@pytest.fixture
def idx(http_server: FaultyServer):
    return make_idx_raw(http_server.root)


def _files(folder: Path) -> list[str]:
    """Every entry in ``folder``, hidden temp files included."""
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_idx_download_from_a_mirror_verifies_content(tmp_path, http_server, idx, capsys):
    dest = tmp_path / "raw" / "mnist"
    fetched = download_dataset(offline_spec("mnist"), dest, mirrors=[http_server.url], checksums=idx.checksums, **FAST)
    assert _files(dest) == sorted(IDX_NAMES.values())
    for name in IDX_NAMES.values():
        assert (dest / name).read_bytes() == (idx.folder / name).read_bytes()
    assert {f.source for f in fetched} == {http_server.url}
    assert all(f.verified_by == "content SHA-256 (data.checksums)" for f in fetched)
    out = capsys.readouterr().out
    assert f"{TRAIN_IMAGES} <- {http_server.url} (content SHA-256 (data.checksums) verified" in out


def test_upstream_md5_is_enough_without_a_pin(tmp_path, http_server, idx):
    md5s = {name: md5(idx.folder / name) for name in IDX_NAMES.values()}
    spec = offline_spec("mnist", urls=(http_server.url,), md5s=md5s)
    fetched = download_dataset(spec, tmp_path / "raw", **FAST)
    assert [f.verified_by for f in fetched] == ["upstream MD5"] * 4
    assert [f.source for f in fetched] == [http_server.url] * 4  # the upstream URL, last in line


def test_cifar_archive_download(tmp_path, http_server):
    cifar = make_cifar_raw(http_server.root)
    dest = tmp_path / "raw" / "cifar10"
    fetched = download_dataset(offline_spec("cifar10"), dest, mirrors=[http_server.url], checksums=cifar.checksums, **FAST)
    assert _files(dest) == [CIFAR_ARCHIVE]
    assert (dest / CIFAR_ARCHIVE).read_bytes() == cifar.archive.read_bytes()
    assert fetched[0].verified_by == "content SHA-256 (data.checksums)"


def test_cifar_html_page_refused(tmp_path, http_server):
    cifar = make_cifar_raw(http_server.root)
    bad = http_server.fault("bad", "html")
    with pytest.raises(DataError, match="HTML"):
        download_dataset(offline_spec("cifar10"), tmp_path / "raw", mirrors=[bad], checksums=cifar.checksums, **FAST)
    assert not (tmp_path / "raw").exists()


def test_files_already_present_are_skipped(tmp_path, http_server, idx, capsys):
    dest = tmp_path / "raw"
    download_dataset(offline_spec("mnist"), dest, mirrors=[http_server.url], checksums=idx.checksums, **FAST)
    before = http_server.total_hits
    fetched = download_dataset(offline_spec("mnist"), dest, mirrors=[http_server.url], checksums=idx.checksums, **FAST)
    assert http_server.total_hits == before
    assert all(f.source is None for f in fetched)
    assert f"{TRAIN_IMAGES}: already present" in capsys.readouterr().out


def test_a_damaged_present_file_is_replaced(tmp_path, http_server, idx, capsys):
    dest = tmp_path / "raw"
    dest.mkdir()
    (dest / TRAIN_IMAGES).write_bytes(b"\x1f\x8b garbage")
    download_dataset(offline_spec("mnist"), dest, mirrors=[http_server.url], checksums=idx.checksums, **FAST)
    assert (dest / TRAIN_IMAGES).read_bytes() == (idx.folder / TRAIN_IMAGES).read_bytes()
    assert "failed verification" in capsys.readouterr().out


def test_recovers_from_a_mid_file_drop_by_retrying(tmp_path, http_server, idx):
    flaky = http_server.fault("flaky", "drop", times=2)
    fetched = download_dataset(offline_spec("mnist"), tmp_path / "raw", mirrors=[flaky], checksums=idx.checksums, **FAST)
    assert http_server.hits(TRAIN_IMAGES, "flaky") == 3  # two dropped, the third whole
    assert fetched[0].source == flaky
    assert (tmp_path / "raw" / TRAIN_IMAGES).read_bytes() == (idx.folder / TRAIN_IMAGES).read_bytes()


@pytest.mark.parametrize(
    ("mode", "reason"),
    [
        ("corrupt", "corrupt"),
        ("altered", "checksum mismatch"),
        ("html", "HTML"),
        ("redirect", "redirect loop"),
        ("short", "truncated"),
        ("drop", "truncated"),
        ("status", "HTTP 500"),
    ],
)
def test_a_bad_source_falls_back_to_the_next(tmp_path, http_server, idx, mode, reason, capsys):
    bad = http_server.fault("bad", mode)
    good = http_server.url + "good/"
    dest = tmp_path / "raw"
    fetched = download_dataset(offline_spec("mnist"), dest, mirrors=[bad, good], checksums=idx.checksums, **FAST)
    assert [f.source for f in fetched] == [good] * 4
    assert _files(dest) == sorted(IDX_NAMES.values())  # no temp file left behind
    for name in IDX_NAMES.values():
        assert (dest / name).read_bytes() == (idx.folder / name).read_bytes()
    with pytest.raises(DataError) as err:
        download_dataset(offline_spec("mnist"), tmp_path / "again", mirrors=[bad], checksums=idx.checksums, **FAST)
    assert f"{bad} ({reason}" in str(err.value)


def test_a_stalled_server_times_out_and_the_next_source_is_used(tmp_path, http_server, idx):
    slow = http_server.fault("slow", "slow", times=2, delay=5.0)
    good = http_server.url + "good/"
    fetched = download_dataset(offline_spec("mnist"), tmp_path / "raw", mirrors=[slow, good], checksums=idx.checksums,
                               timeout=0.3, retries=1, backoff=0.01, progress=False)
    assert fetched[0].source == good
    assert http_server.hits(TRAIN_IMAGES, "slow") == 2  # first try + one retry, each timed out


def test_local_folder_and_file_url_mirrors(tmp_path, idx, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fetched = download_dataset(offline_spec("mnist"), tmp_path / "a", mirrors=["www"], checksums=idx.checksums, **FAST)
    assert fetched[0].source == str(tmp_path / "www")
    fetched = download_dataset(offline_spec("mnist"), tmp_path / "b", mirrors=[idx.folder.as_uri()],
                               checksums=idx.checksums, **FAST)
    assert fetched[0].source == str(idx.folder)


def test_system_copy_is_used_after_mirrors(tmp_path, http_server, idx):
    spec = offline_spec("mnist", system_dirs=(str(idx.folder),), urls=("http://127.0.0.1:9/",))
    missing = http_server.fault("missing", "status", status=404)
    fetched = download_dataset(spec, tmp_path / "raw", mirrors=[missing], checksums=idx.checksums, **FAST)
    assert [f.source for f in fetched] == [str(idx.folder)] * 4


def test_when_every_source_fails_one_line_lists_them_and_nothing_is_left(tmp_path, http_server, idx):
    altered = http_server.fault("altered", "altered")
    empty = tmp_path / "empty"
    empty.mkdir()
    spec = offline_spec("mnist", system_dirs=(str(empty),), urls=("http://127.0.0.1:9/",))
    dest = tmp_path / "data" / "raw" / "mnist"
    with pytest.raises(DataError) as err:
        download_dataset(spec, dest, mirrors=[altered], checksums=idx.checksums, **FAST)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"mnist: could not get {TRAIN_IMAGES}: ")
    assert f"{altered} (checksum mismatch)" in message
    assert f"{empty} (missing)" in message
    assert "http://127.0.0.1:9/ (network error" in message
    assert message.index(altered) < message.index(str(empty)) < message.index("127.0.0.1:9")
    assert "add a mirror in data.mirrors" in message
    assert not dest.exists()  # not even an empty folder, let alone a partial file


def test_a_failure_after_some_files_keeps_only_verified_ones(tmp_path, http_server, idx):
    # train images fine, train labels corrupt everywhere
    (idx.folder / IDX_NAMES["train_labels"]).write_bytes(b"<html>gone</html>")
    dest = tmp_path / "raw"
    with pytest.raises(DataError, match=IDX_NAMES["train_labels"]):
        download_dataset(offline_spec("mnist"), dest, mirrors=[http_server.url], checksums=idx.checksums, **FAST)
    assert _files(dest) == [TRAIN_IMAGES]


def test_a_file_with_no_checksum_at_all_is_refused(tmp_path, http_server, idx):
    spec = offline_spec("mnist", md5s={name: "" for name in IDX_NAMES.values()})
    with pytest.raises(DataError, match="no checksum known; pin it in data.checksums"):
        download_dataset(spec, tmp_path / "raw", mirrors=[http_server.url], **FAST)


def test_source_order_mirrors_then_system_then_upstream(tmp_path):
    spec = get_dataset("fashion-mnist")
    sources = sources_for(spec, ["http://m.example/x", "rel/dir", "file:///srv/mirror/"], base_dir=tmp_path)
    assert [s.kind for s in sources] == ["mirror", "mirror", "mirror", "system", "upstream"]
    assert sources[0].location == "http://m.example/x/"
    assert sources[1].location == str(tmp_path / "rel" / "dir")
    assert sources[2].location == "/srv/mirror"
    assert sources[3].location == "/usr/share/datasets/fashion-mnist"
    assert sources[4].locate("a.gz") == spec.urls[0] + "a.gz"
    assert mirror_source("~/x").location == str(Path("~/x").expanduser())
    assert isinstance(sources[0], Source) and sources[0].is_remote and not sources[1].is_remote


def test_pins_override_the_registry_content_digest(tmp_path, http_server, idx):
    spec = offline_spec("fashion-mnist")  # the registry pins the real Fashion-MNIST content
    with pytest.raises(DataError, match=r"\(checksum mismatch\)"):
        download_dataset(spec, tmp_path / "a", mirrors=[http_server.url], **FAST)
    fetched = download_dataset(spec, tmp_path / "b", mirrors=[http_server.url], checksums=idx.checksums, **FAST)
    assert [f.verified_by for f in fetched] == ["content SHA-256 (data.checksums)"] * 4


def test_a_truncated_local_copy_is_not_retried(tmp_path, http_server, idx):
    local = tmp_path / "local"
    local.mkdir()
    blob = (idx.folder / TRAIN_IMAGES).read_bytes()
    (local / TRAIN_IMAGES).write_bytes(blob[: len(blob) // 2])
    spec = offline_spec("mnist", system_dirs=(str(local),))
    with pytest.raises(DataError) as err:
        download_dataset(spec, tmp_path / "raw", checksums=idx.checksums, **FAST)
    assert f"{local} (truncated: the gzip stream ends early)" in str(err.value)  # one attempt, no "3 attempts"
