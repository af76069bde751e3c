"""``python stages/train.py`` end to end, as DVC runs it, in a temp project.

The project is laid out like a queued experiment: the stage runs in ``work/``
(params.yaml, data/prepared, stages/train.py) while ``$DVC_ROOT`` points at a
separate ``root/``, where the MLflow store must land. One successful stage run
is shared by the module; the failure tests then check it is left untouched.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
from pathlib import Path

import pandas as pd
import pytest
import yaml

from cnnpipe.reports.train_files import GRID_COLUMNS, HISTORY_COLUMNS, TRAIN_JSON_KEYS
from project_builder import make_project, run_stage, write_params

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One successful stage run (2-run grid), with import timing to check dvc.yaml deps."""
    work, root = make_project(tmp_path_factory.mktemp("train-stage"))
    proc = run_stage(work, root, "-X", "importtime", env={"DVC_EXP_NAME": "exp-tiny-grid"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work, root, proc


def mlflow_client(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def test_stage_writes_every_report_with_the_documented_columns(project):
    work, _, proc = project
    reports = work / "reports"
    grid = pd.read_csv(reports / "grid.csv")
    assert list(grid.columns) == list(GRID_COLUMNS)
    assert list(grid["run_name"]) == ["lr=0.05", "lr=0.01"] and set(grid["status"]) == {"finished"}
    assert json.loads((reports / "grid.json").read_text())[0].keys() == set(GRID_COLUMNS)
    history = pd.read_csv(reports / "history.csv")
    assert list(history.columns) == list(HISTORY_COLUMNS) and len(history) == 4
    train = json.loads((reports / "train.json").read_text())
    assert list(train) == list(TRAIN_JSON_KEYS)
    assert train["runs_total"] == 2 and train["runs_failed"] == 0 and train["select_by"] == "val_loss"
    curves = pd.read_csv(reports / "curves.csv")
    assert list(curves.columns) == list(HISTORY_COLUMNS)
    assert set(curves["run_id"]) == {train["run_id"]} and list(curves["epoch"]) == [1, 2]
    best_row = grid[grid["run_id"] == train["run_id"]].iloc[0]
    assert best_row["val_loss"] == pytest.approx(train["val_loss"]) == pytest.approx(grid["val_loss"].min())
    assert "run 1/2 lr=0.05: best val_loss" in proc.stdout and "selected by val_loss" in proc.stdout


def test_models_best_is_the_selected_run(project):
    from cnnpipe.models.checkpoint import load_checkpoint

    work, _, _ = project
    train = json.loads((work / "reports" / "train.json").read_text())
    ckpt = load_checkpoint(work / "models" / "best")
    assert ckpt.sidecar["run_id"] == train["run_id"]
    assert ckpt.sidecar["metrics"]["val_loss"] == pytest.approx(train["val_loss"])
    assert ckpt.sidecar["mlflow_run_id"] == train["mlflow_run_id"]
    assert (work / "models" / "best" / "summary.txt").is_file()


def test_mlflow_store_lands_at_dvc_root_with_parent_children_and_model_version(project):
    work, root, _ = project
    assert (root / "mlflow.db").is_file() and (root / "mlartifacts").is_dir()
    assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists()
    train = json.loads((work / "reports" / "train.json").read_text())
    client = mlflow_client(root)
    parent = client.get_run(train["mlflow_parent_run_id"])
    assert parent.info.run_name == "exp-tiny-grid" and parent.info.status == "FINISHED"
    assert parent.data.tags["dvc.stage"] == "train" and parent.data.tags["best_run_id"] == train["run_id"]
    children = client.search_runs([train["mlflow_experiment_id"]],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == ["lr=0.01", "lr=0.05"]
    assert all(c.info.status == "FINISHED" for c in children)
    versions = client.search_model_versions("name = 'cnnpipe-classifier'")
    assert [v.run_id for v in versions] == [train["mlflow_run_id"]]


def test_dvc_yaml_deps_cover_every_module_the_stage_imports(project):
    _, _, proc = project
    modules = set(re.findall(r"\|\s+(cnnpipe(?:\.\w+)*)\s*$", proc.stderr, flags=re.MULTILINE))
    assert "cnnpipe.engine.loop" in modules and "cnnpipe.tracking" in modules
    files = set()
    for module in modules:
        path = ROOT / "src" / Path(*module.split("."))
        files.add((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(ROOT).as_posix())
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]
    deps = list(stage["deps"])
    from cnnpipe.codegraph.stage_deps import WRITE_COMMAND, uncovered

    assert uncovered(sorted(files), deps) == [], f"the train stage's deps in dvc.yaml miss these: {WRITE_COMMAND}"
    assert all((ROOT / dep).exists() for dep in deps if dep.startswith(("src/", "stages/")))
    from cnnpipe.params.values import TRAINING_KEYS

    assert stage["params"] == [*TRAINING_KEYS, "pretrained", "models", "select_by", "max_cost", "device", "grid", "mlflow",
                               "data.dataset", "data.source"]  # the MLflow dataset input names a folder dataset by its source


def test_all_runs_diverging_fails_and_keeps_models_best(project):
    work, root, _ = project
    before = tree_digest(work / "models" / "best")
    train_before = (work / "reports" / "train.json").read_text()
    # batch 32: both diverge inside epoch 1, before any finite validation epoch (then they would be candidates)
    write_params(work, lr=[1000.0, 10000.0], optimizer="sgd", batch_size=32)
    try:
        proc = run_stage(work, root)
    finally:
        write_params(work)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: all 2 grid runs failed (first: lr=1000.0: diverged: loss is nan at epoch")
    assert "FAILED (diverged" in proc.stdout
    assert tree_digest(work / "models" / "best") == before
    assert (work / "reports" / "train.json").read_text() == train_before
    client = mlflow_client(root)
    parents = client.search_runs(["1"], filter_string="tags.`cnnpipe.role` = 'parent'", order_by=["attributes.start_time DESC"])
    assert parents[0].info.status == "FAILED" and parents[0].data.tags["failure_reason"].startswith("GridFailed: all 2")


def test_unreachable_tracking_server_fails_in_one_line_before_training(project):
    work, root, _ = project
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    before = tree_digest(work / "models" / "best")
    proc = run_stage(work, root, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith(f"error: MLflow tracking server http://127.0.0.1:{port} is unreachable")
    assert "MLFLOW_TRACKING_URI" in proc.stderr
    assert "train:" not in proc.stdout and "run 1/" not in proc.stdout
    assert tree_digest(work / "models" / "best") == before


def test_stage_without_mlflow_writes_null_ids(tmp_path):
    work, root = make_project(tmp_path)
    write_params(work, lr=0.01, epochs=1, mlflow={"enabled": False})
    proc = run_stage(work, root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train = json.loads((work / "reports" / "train.json").read_text())
    assert train["mlflow_run_id"] is None and train["mlflow_parent_run_id"] is None and train["runs_total"] == 1
    assert pd.read_csv(work / "reports" / "grid.csv")["mlflow_run_id"].isna().all()
    assert not (root / "mlflow.db").exists()
