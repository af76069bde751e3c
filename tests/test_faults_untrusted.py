"""Untrusted prepared data: a split or ``stats.json`` swapped for another dataset's.

``data/prepared/`` is read by train and evaluate. Whatever is put there --
another dataset's split, a ``stats.json`` that does not describe the splits,
a pickle posing as a safetensors file (with the hash in ``stats.json``
forged to match) -- must be refused with one line naming the file and the
fix, before anything is trained or written, and no code from a file may run.
Checkpoint tampering (pickle payloads, unknown layers, truncation) is covered
in ``test_checkpoint.py``.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from cnnpipe.data.prepared import load_split
from cnnpipe.engine.data import TrainData
from cnnpipe.util.errors import DataError
from fixtures_raw import Evil
from project_builder import ROOT, run_stage, stage_project
from synthetic import make_prepared


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _stats(folder: Path) -> dict:
    return json.loads((folder / "stats.json").read_text())


def _write_stats(folder: Path, stats: dict) -> None:
    (folder / "stats.json").write_text(json.dumps(stats))


def _forge_hash(folder: Path, name: str) -> None:
    """Make stats.json vouch for whatever ``name`` now holds (an attacker who edits both files)."""
    stats = _stats(folder)
    stats["files"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    _write_stats(folder, stats)


def swap_split_from_cifar(prepared: Path, other: Path) -> None:
    """train.safetensors replaced by another dataset's (3x32x32 CIFAR-shaped) train split."""
    shutil.copy(other / "train.safetensors", prepared / "train.safetensors")


def swap_split_and_forge_hash(prepared: Path, other: Path) -> None:
    """As above, and stats.json's hash forged to match: the shape check must still refuse it."""
    swap_split_from_cifar(prepared, other)
    _forge_hash(prepared, "train.safetensors")


def swap_stats_json(prepared: Path, other: Path) -> None:
    """stats.json replaced by the other dataset's: it describes files that are not there."""
    shutil.copy(other / "stats.json", prepared / "stats.json")


def stats_with_fewer_classes(prepared: Path, other: Path) -> None:
    """stats.json edited to claim 5 classes (hashes intact): labels 5..9 are out of range."""
    stats = _stats(prepared)
    stats["classes"] = stats["classes"][:5]
    _write_stats(prepared, stats)


def stats_not_json(prepared: Path, other: Path) -> None:
    (prepared / "stats.json").write_bytes(b"\x80\x04\x95 not json")


def stats_not_ours(prepared: Path, other: Path) -> None:
    _write_stats(prepared, {"dataset": "mnist", "classes": list("0123456789")})


TAMPERING: list[tuple[str, Callable[[Path, Path], None], str]] = [
    ("split-from-another-dataset", swap_split_from_cifar,
     "train.safetensors does not match stats.json (different content: swapped or modified)"),
    ("split-swapped-hash-forged", swap_split_and_forge_hash,
     "train.safetensors holds (100, 3, 32, 32) images but stats.json says 100 x (1, 28, 28)"),
    ("stats-json-of-another-dataset", swap_stats_json, "train.safetensors does not match stats.json"),
    ("stats-json-fewer-classes", stats_with_fewer_classes, "train.safetensors has labels outside 0..4"),
    ("stats-json-garbage", stats_not_json, "stats.json is not valid JSON"),
    ("stats-json-foreign", stats_not_ours, "stats.json is not a cnnpipe prepared-data file"),
]


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    prepared = tmp_path / "prepared"
    make_prepared(prepared, n_train=100, n_val=20, n_test=20)
    other = tmp_path / "other"
    make_prepared(other, n_train=100, n_val=20, n_test=20, shape=(3, 32, 32), dataset="cifar10", seed=5)
    return prepared, other


@pytest.mark.parametrize("tamper,expected", [(t, e) for _, t, e in TAMPERING], ids=[c[0] for c in TAMPERING])
def test_tampered_prepared_data_is_refused_in_one_line(folders, tamper, expected) -> None:
    prepared, other = folders
    TrainData.load(prepared, splits=("train", "val"))  # the untouched folder loads
    tamper(prepared, other)
    with pytest.raises(DataError) as err:
        TrainData.load(prepared, splits=("train", "val"))
    message = str(err.value)
    assert expected in message
    assert "\n" not in message and "prepare" in message  # names the fix: re-run the prepare stage


def test_a_pickle_posing_as_a_split_never_runs(folders, tmp_path: Path) -> None:
    prepared, _ = folders
    marker = tmp_path / "pwned"
    (prepared / "train.safetensors").write_bytes(pickle.dumps({"images": Evil(f"touch {marker}")}))
    _forge_hash(prepared, "train.safetensors")
    with pytest.raises(DataError, match=r"train\.safetensors is unreadable .*re-run the prepare stage"):
        load_split(prepared, "train")
    assert not marker.exists()


# --------------------------------------------------------------------------- the stages that read it


@pytest.mark.slow
def test_train_stage_refuses_a_swapped_split_and_keeps_its_outputs(tmp_path: Path) -> None:
    work, root = stage_project(tmp_path / "proj", mlflow={"enabled": False})
    best = work / "models" / "best"
    best.mkdir(parents=True)
    (best / "model.json").write_text('{"previous": "good model"}')
    (work / "reports").mkdir()
    (work / "reports" / "train.json").write_text('{"previous": true}')
    before = tree_digest(work / "models") | tree_digest(work / "reports")
    other = tmp_path / "other"
    make_prepared(other, n_train=300, n_val=100, n_test=20, shape=(3, 32, 32), dataset="cifar10", seed=5)
    swap_split_from_cifar(work / "data" / "prepared", other)

    done = run_stage(work, root)
    assert done.returncode == 1
    assert done.stderr.strip() == ("error: data/prepared/train.safetensors does not match stats.json (different "
                                   "content: swapped or modified); re-run the prepare stage (dvc repro -f prepare) "
                                   "or dvc checkout data/prepared")
    assert "train:" not in done.stdout  # refused before training started
    assert tree_digest(work / "models") | tree_digest(work / "reports") == before
    assert sorted(p.name for p in root.iterdir()) == []  # no MLflow store, no run cache


@pytest.mark.slow
def test_evaluate_stage_refuses_a_swapped_test_split(tmp_path: Path) -> None:
    from test_evaluate_stage import _train_checkpoint

    project = tmp_path / "proj"
    prepared = project / "data" / "prepared"
    make_prepared(prepared, n_train=200, n_val=40, n_test=40)
    _train_checkpoint(prepared, project / "models" / "best")
    (project / "stages").mkdir()
    shutil.copy(ROOT / "stages" / "evaluate.py", project / "stages" / "evaluate.py")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["mlflow"]["enabled"] = False
    params["eval"]["mistakes"] = 4
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    other = tmp_path / "other"
    make_prepared(other, n_train=200, n_val=40, n_test=40, seed=9)  # same shape, other images
    shutil.copy(other / "test.safetensors", prepared / "test.safetensors")
    before = tree_digest(project / "models")

    done = subprocess.run([sys.executable, "stages/evaluate.py"], cwd=project, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert lines[0].startswith("error: data/prepared/test.safetensors does not match stats.json")
    assert not (project / "reports").exists()
    assert tree_digest(project / "models") == before
