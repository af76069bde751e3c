"""The download and prepare stages as users run them: stage scripts and the real ``dvc repro``."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from fixtures_raw import IDX_NAMES, make_idx_raw, no_proxy, serve  # noqa: F401 - no_proxy is a fixture
from project_builder import BIN, ROOT
from project_builder import run as _run

DATA_STAGES = ("download", "prepare")


def _project(folder: Path, data: dict[str, object]) -> Path:
    """A copy of this project's data stages: dvc.yaml (download + prepare), params.yaml, stages/, src/."""
    folder.mkdir()
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    pipeline = {"stages": {name: pipeline["stages"][name] for name in DATA_STAGES}}
    (folder / "dvc.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(data)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (folder / "stages").mkdir()
    for name in DATA_STAGES:
        shutil.copy(ROOT / "stages" / f"{name}.py", folder / "stages")
    # dvc.yaml lists src/cnnpipe/data/*.py as deps; the stages import the installed package.
    shutil.copytree(ROOT / "src" / "cnnpipe", folder / "src" / "cnnpipe", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


@pytest.mark.slow
def test_dvc_repro_prepare_from_a_loopback_mirror(tmp_path, no_proxy):
    fixture = make_idx_raw(tmp_path / "www", n_train=200, n_test=40)
    with contextlib.contextmanager(serve)(fixture.folder) as server:
        project = _project(tmp_path / "project", {"dataset": "mnist", "mirrors": [server.url], "checksums": fixture.checksums})
        for args in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
            done = _run(args, project)
            assert done.returncode == 0, done.stderr

        first = _run([str(BIN / "dvc"), "repro", "prepare"], project)
        assert first.returncode == 0, first.stdout + first.stderr
        assert f"{IDX_NAMES['train_images']} <- {server.url} (content SHA-256 (data.checksums) verified" in first.stdout
        assert "prepare: mnist: train 180, val 20, test 40 images of 1x28x28, 10 classes" in first.stdout

        raw = project / "data" / "raw" / "mnist"
        assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_NAMES.values())
        stats = json.loads((project / "data" / "prepared" / "stats.json").read_text())
        assert stats["sizes"] == {"train": 180, "val": 20, "test": 40}
        assert stats["sources"] == fixture.checksums
        assert (project / "reports" / "samples.png").stat().st_size > 10_000
        assert (project / "dvc.lock").is_file()

        hits = server.total_hits
        second = _run([str(BIN / "dvc"), "repro", "prepare"], project)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "didn't change" in second.stdout or "up to date" in second.stdout
        assert "prepare: mnist" not in second.stdout
        assert server.total_hits == hits  # nothing downloaded again


@pytest.mark.parametrize("stage", DATA_STAGES)
def test_corrupt_params_exit_2_with_one_line_and_write_nothing(tmp_path, stage):
    project = tmp_path / "p"
    (project / "stages").mkdir(parents=True)
    shutil.copy(ROOT / "stages" / f"{stage}.py", project / "stages")
    (project / "params.yaml").write_text("data:\n  dataset: fashion-mnist\n  val_fraction: 1.5\n")
    done = _run([sys.executable, f"stages/{stage}.py"], project, timeout=120)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: params.yaml: data.val_fraction must be < 1")
    assert sorted(p.name for p in project.iterdir()) == ["params.yaml", "stages"]


def test_download_stage_from_a_folder_mirror(tmp_path):
    fixture = make_idx_raw(tmp_path / "mirror", n_train=20, n_test=10)
    project = tmp_path / "p"
    (project / "stages").mkdir(parents=True)
    shutil.copy(ROOT / "stages" / "download.py", project / "stages")
    params = {"data": {"dataset": "kmnist", "mirrors": ["../mirror"], "checksums": fixture.checksums}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    done = _run([sys.executable, "stages/download.py"], project, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"<- {fixture.folder}" in done.stdout
    assert "download: kmnist: 4 files" in done.stdout
    assert sorted(p.name for p in (project / "data" / "raw" / "kmnist").iterdir()) == sorted(IDX_NAMES.values())
