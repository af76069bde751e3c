"""Download faults the function-level tests in ``test_download.py`` leave open.

* The retry policy per fault, measured on a faulty loopback server: a fault
  that may pass (connection dropped mid-file, Content-Length larger than the
  body, a short body, a stalled server) is retried ``retries`` times; one
  that will not (corrupted bytes, an HTML page with status 200, a redirect
  loop, an HTTP error) moves on to the next source at once.
* ``stages/download.py`` itself, as DVC runs it: bad mirrors before a good
  one (the next source is used, no partial file), and every source bad (one
  line naming each source and its reason, exit 1, no ``data/raw/<dataset>``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cnnpipe.data.download import download_dataset
from cnnpipe.util.errors import DataError
from fixtures_raw import (  # noqa: F401 - pytest fixtures
    IDX_NAMES,
    FaultyServer,
    http_server,
    make_idx_raw,
    no_proxy,
    offline_spec,
)
from project_builder import ROOT, clean_env

TRAIN_IMAGES = IDX_NAMES["train_images"]


@pytest.fixture
def idx(http_server: FaultyServer):
    return make_idx_raw(http_server.root, n_train=60, n_test=20)


def hits_for(server: FaultyServer, idx, tmp_path: Path, mode: str, retries: int, tag: str) -> int:
    """GETs of the first file from a source that always shows ``mode``, before the download gives up."""
    prefix = f"{mode}-{tag}"
    bad = server.fault(prefix, mode, delay=3.0)
    dest = tmp_path / prefix
    with pytest.raises(DataError) as err:
        download_dataset(offline_spec("mnist"), dest, mirrors=[bad], checksums=idx.checksums,
                         timeout=0.5, retries=retries, backoff=0.01, progress=False)
    assert str(err.value).startswith(f"mnist: could not get {TRAIN_IMAGES}: {bad} (")
    assert not dest.exists()  # no folder, no partial file
    return server.hits(TRAIN_IMAGES, prefix)


@pytest.mark.parametrize("mode", ["drop", "short", "slow"])
def test_transient_faults_are_retried(tmp_path, http_server, idx, mode):
    once = hits_for(http_server, idx, tmp_path, mode, retries=0, tag="r0")
    assert hits_for(http_server, idx, tmp_path, mode, retries=2, tag="r2") == 3 * once


@pytest.mark.parametrize("mode", ["corrupt", "html", "redirect", "status"])
def test_bad_content_is_not_retried(tmp_path, http_server, idx, mode):
    once = hits_for(http_server, idx, tmp_path, mode, retries=0, tag="r0")
    assert once >= 1
    assert hits_for(http_server, idx, tmp_path, mode, retries=3, tag="r3") == once


# --------------------------------------------------------------------------- the stage script


def download_project(tmp_path: Path, mirrors: list[str], checksums: dict[str, str]) -> Path:
    project = tmp_path / "proj"
    (project / "stages").mkdir(parents=True)
    shutil.copy(ROOT / "stages" / "download.py", project / "stages" / "download.py")
    (project / "dvc.yaml").write_text("stages: {}\n")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update({"dataset": "mnist", "mirrors": mirrors, "checksums": checksums,
                           "download": {"timeout": 1, "retries": 1}})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return project


def run_download(project: Path) -> subprocess.CompletedProcess[str]:
    # Upstream is unreachable on purpose: anything that is not loopback goes to a dead proxy port.
    env = clean_env(project, {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9",
                              "PYTHONPATH": str(ROOT / "src")})
    return subprocess.run([sys.executable, "stages/download.py"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_stage_skips_bad_mirrors_and_leaves_no_partial_file(tmp_path, http_server, idx):
    bad = [http_server.fault(mode, mode) for mode in ("html", "redirect", "drop", "corrupt")]
    good = http_server.url + "good/"
    project = download_project(tmp_path, [*bad, good], idx.checksums)
    done = run_download(project)
    assert done.returncode == 0, done.stderr[-3000:]
    raw = project / "data" / "raw" / "mnist"
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_NAMES.values())  # no .part file left
    for name in IDX_NAMES.values():
        assert (raw / name).read_bytes() == (idx.folder / name).read_bytes()
        assert f"{name} <- {good} (content SHA-256 (data.checksums) verified" in done.stdout
    assert http_server.hits(TRAIN_IMAGES, "drop") == 2  # first try + data.download.retries: 1


@pytest.mark.slow
def test_stage_with_every_source_bad_is_one_line_and_writes_nothing(tmp_path, http_server, idx):
    bad = [http_server.fault(mode, mode) for mode in ("html", "redirect", "short")]
    project = download_project(tmp_path, bad, idx.checksums)
    done = run_download(project)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = lines[0]
    assert line.startswith(f"error: mnist: could not get {TRAIN_IMAGES}: ")
    assert f"{bad[0]} (HTML" in line
    assert f"{bad[1]} (redirect loop" in line
    assert f"{bad[2]} (truncated" in line and "2 attempts" in line
    assert line.index(bad[0]) < line.index(bad[1]) < line.index(bad[2])  # tried in order
    assert line.endswith("add a mirror in data.mirrors (a folder or URL holding the files) or check your network")
    assert not (project / "data" / "raw" / "mnist").exists()
