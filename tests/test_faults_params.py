"""Malformed params.yaml against the real stage scripts of a project that already has outputs.

``test_params.py`` checks 45+ malformed files through ``cnnpipe validate``.
Here each stage script (``download``, ``prepare``, ``train``, ``evaluate``,
``plots``) runs as DVC runs it, in a temp project whose ``data/raw``,
``data/prepared``, ``models/best`` and ``reports`` already exist: a bad file
must give one line naming the key, exit 2, no traceback, and leave every file
of the project byte-identical (nothing written, replaced or deleted, not even
a temp file or an MLflow store). ``CNNPIPE_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures_raw import gunzip_sha256, make_idx_raw
from project_builder import ROOT
from synthetic import make_prepared

pytestmark = pytest.mark.slow

STAGES = tuple(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])  # every stage of the pipeline


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` (hidden ones included) with its content digest."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = path.relative_to(folder).as_posix()
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return out


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Stages, a valid params.yaml, and outputs of every stage already in place."""
    root = tmp_path_factory.mktemp("params-faults")
    shutil.copytree(ROOT / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "dvc.yaml").write_text("stages: {}\n")  # project_root() finds the project by it
    make_idx_raw(root / "data" / "raw" / "mnist", n_train=40, n_test=20)
    make_prepared(root / "data" / "prepared", n_train=40, n_val=20, n_test=20, dataset="mnist")
    best = root / "models" / "best"
    best.mkdir(parents=True)
    (best / "model.safetensors").write_bytes(b"previous good weights")
    (best / "model.json").write_text('{"previous": "good model"}')
    (root / "reports" / "figures").mkdir(parents=True)
    for name in ("grid.csv", "history.csv", "curves.csv", "train.json", "metrics.json", "per_class.csv",
                 "confusion.csv", "mistakes.csv", "samples.png", "README.md", "figures/curves.png"):
        (root / "reports" / name).write_text(f"previous {name}\n")
    return root


def good_params() -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"]["dataset"] = "mnist"
    return raw


def changed(**changes) -> str:
    raw = good_params()
    for key, value in changes.items():
        if "__" in key:
            section, leaf = key.split("__", 1)
            raw[section][leaf] = value
        else:
            raw[key] = value
    return yaml.safe_dump(raw, sort_keys=False)


# (id, stage, params.yaml text, exact one-line message after "error: params.yaml: ")
CASES = [
    ("yaml-syntax", "download", "lr: [0.1, 0.01\nbatch_size: 100\n", "YAML syntax error"),
    ("mirror-ftp", "download", changed(data__mirrors=["ftp://example.org/mnist/"]), "data.mirrors[0]"),
    ("unknown-key", "prepare", changed(data__val_fractoin=0.2), "unknown key 'val_fractoin' in data"),
    ("val-fraction-one", "prepare", changed(data__val_fraction=1.0), "data.val_fraction must be < 1"),
    ("lr-negative", "train", changed(lr=-0.1), "lr must be > 0"),
    ("grid-too-large", "train", changed(lr=[0.001 * (i + 1) for i in range(13)], batch_size=[10, 20, 30, 40, 50]),
     "65 runs"),
    ("unknown-model", "train", changed(model="resnet50"), "unknown model 'resnet50'"),
    ("bad-layer", "train", changed(models={"tiny": [{"conv": 4, "kernal": 3}, "flatten", "linear"]}, model="tiny"),
     "models.tiny[0]"),
    ("empty-grid", "train", changed(batch_size=[]), "batch_size is an empty list"),
    ("top-k-too-large", "evaluate", changed(eval={"top_k": [1, 11], "batch_size": 100, "mistakes": 5}),
     "eval.top_k has 11"),
    ("mlflow-not-bool", "plots", changed(mlflow={"enabled": "maybe"}), "mlflow.enabled must be true or false"),
]


def run_script(project: Path, stage: str, debug: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CNNPIPE_DEBUG", "MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", CNNPIPE_DEBUG="1" if debug else "")
    return subprocess.run([sys.executable, f"stages/{stage}.py"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("stage,text,words", [c[1:] for c in CASES], ids=[f"{c[1]}-{c[0]}" for c in CASES])
def test_bad_params_stop_the_stage_before_it_touches_any_output(project: Path, stage: str, text: str, words: str) -> None:
    (project / "params.yaml").write_text(text)
    before = snapshot(project)
    done = run_script(project, stage)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert lines[0].startswith("error: params.yaml: ") and words in lines[0]
    assert done.stdout == ""
    assert snapshot(project) == before


def test_with_valid_params_the_same_stage_runs(project: Path) -> None:
    """Guard for the test above: the refusals came from params, not from a project the stages cannot use."""
    raw = project / "data" / "raw" / "mnist"
    (project / "params.yaml").write_text(
        changed(data__checksums={p.name: gunzip_sha256(p) for p in sorted(raw.iterdir())}))
    before = snapshot(project)
    done = run_script(project, "download")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "train-images-idx3-ubyte.gz: already present" in done.stdout
    assert snapshot(project) == before


def test_debug_shows_the_traceback_and_still_writes_nothing(project: Path) -> None:
    (project / "params.yaml").write_text(changed(lr=-0.1))
    before = snapshot(project)
    done = run_script(project, "train", debug=True)
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "ParamsError" in done.stderr and "lr must be > 0" in done.stderr
    assert snapshot(project) == before
