"""A queue left with a ``Queued`` experiment and no worker recovers with ``dvc queue start``.

DVC's Celery queue sometimes ends a worker while an experiment is still
queued (seen with ``-j 1`` and two experiments). This test makes that state
deterministically: one experiment runs to Success, its worker is ended, and
a second experiment is queued with no worker alive. Promised (README, "A
stuck queue"): ``dvc queue status`` shows it ``Queued``; ``dvc queue start
-j 1`` again runs it to Success without rerunning the first, and the MLflow
store at the root holds exactly one parent run per experiment.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import pytest

from fixtures_raw import make_idx_raw, serve
from project_builder import DVC, TINY, commit_all, pipeline_project, run, run_ok
from test_faults_concurrency import queue_status, start_and_drain, stop_leftover_workers

pytestmark = pytest.mark.slow

SAFETY_S = 900  # a safety net only


def queue_one(project: Path, lr: str) -> str:
    out = run_ok([DVC, "exp", "run", "--queue", "-S", f"lr={lr}"], project).stdout
    names = re.findall(r"Queued experiment '([\w-]+)' for future execution", out)
    assert len(names) == 1, out
    return names[0]


def test_a_queued_experiment_without_worker_runs_after_start_again(tmp_path: Path) -> None:
    raw = make_idx_raw(tmp_path / "www", n_train=200, n_test=40)
    with contextlib.contextmanager(serve)(raw.folder) as server:
        project = pipeline_project(tmp_path / "repo", server.url, raw.checksums, commit=True,
                                   params={"model": "tiny", "models": {"tiny": TINY}, "lr": 0.02, "batch_size": 50})
        run_ok([DVC, "repro"], project, timeout=SAFETY_S)
        commit_all(project, "baseline")
        try:
            first = queue_one(project, "0.01")
            status = start_and_drain(project, jobs=1)
            assert re.search(rf"\b{first}\s+.*\bSuccess\b", status), status
            stop_leftover_workers(project)  # the worker is gone ...
            second = queue_one(project, "0.003")  # ... and an experiment waits: the stuck state
            time.sleep(3)
            stuck = queue_status(project)
            assert re.search(rf"\b{second}\s+.*\bQueued\b", stuck), stuck
            status = start_and_drain(project, jobs=1)  # the recovery the README gives
        finally:
            run([DVC, "queue", "stop"], project, timeout=120)
            stop_leftover_workers(project)

    for name in (first, second):
        assert re.search(rf"\b{name}\s+.*\bSuccess\b", status), status
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnnpipe")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r.data.tags.get("dvc.exp_name") for r in runs if r.data.tags.get("cnnpipe.role") == "parent"
               and r.data.tags.get("dvc.exp_name") in (first, second)]
    assert sorted(parents) == sorted([first, second])  # one each: the first was not rerun
