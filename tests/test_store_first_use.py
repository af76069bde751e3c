"""Four trains start at once on a project whose MLflow store does not exist yet.

MLflow creates a sqlite store's schema on first use, and two processes doing
that at once lose one of them (``table ... already exists``; seen with
``dvc queue start -j 2`` on a fresh project). ``tracking.store_lock``
serialises the first touch. Promised: all four real ``stages/train.py``
processes (each with its own work copy, one shared ``$DVC_ROOT`` as queued
experiments have) exit 0, and the root store holds four FINISHED parents
with two FINISHED children each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from project_builder import stage_project

pytestmark = pytest.mark.slow

TRAINS = 4


def test_four_trains_create_the_store_at_once(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    works = [stage_project(tmp_path / f"exp{i}", epochs=1, grid={"workers": 1, "cache": False})[0] for i in range(TRAINS)]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CNNPIPE_DEBUG")}
    procs = []
    for i, work in enumerate(works):
        run_env = {**env, "DVC_ROOT": str(root), "DVC_STAGE": "train", "DVC_EXP_NAME": f"exp-{i}",
                   "MLFLOW_DISABLE_TELEMETRY": "true", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "stages/train.py"], cwd=work, env=run_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
        assert "already exists" not in out and "without tracking" not in out, out[-3000:]
    assert (root / "mlflow.db").is_file()
    assert not any((work / "mlflow.db").exists() for work in works)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnnpipe")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = {r.data.tags.get("dvc.exp_name"): r for r in runs if r.data.tags.get("cnnpipe.role") == "parent"}
    assert sorted(parents) == [f"exp-{i}" for i in range(TRAINS)]
    for parent in parents.values():
        assert parent.info.status == "FINISHED"
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(c.data.params["lr"] for c in children) == ["0.01", "0.05"]
        assert {c.info.status for c in children} == {"FINISHED"}
    assert len(runs) == TRAINS * 3
