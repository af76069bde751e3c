"""Interruption and determinism of the whole pipeline, with the real ``dvc`` CLI.

One temp project (this repository's pipeline, raw IDX files on a loopback
server) is reproduced once for the module, up to ``evaluate``: that is the
"last good" state. (No test here reads the plots stage's figures, and a
stage process costs seconds: each reproduction that is meant to finish names
the last stage its assertions read.)

* SIGKILL: ``dvc repro`` with a new lr; once the train stage's MLflow child
  run has logged its first epoch, the stage process (its pid is the
  ``cnnpipe.pid`` tag of that run) gets SIGKILL mid-run. ``models/best/`` and
  the reports must stay byte-identical; the next ``dvc repro`` marks the dead
  parent KILLED, resumes the run from its last saved epoch in the same child
  run, trains only the lost epochs and replaces ``models/best/`` with weights
  byte-identical to an uninterrupted training of the same config. (That
  repro is ``dvc repro train``: every promise is about train and its lock
  entry.)
* SIGINT (Ctrl-C) to the stage process: one line, exit 130, DVC fails the
  stage, the runs are KILLED at once, ``models/best/`` untouched.
* Determinism: a second fresh project with the same params gives the same
  ``data/prepared`` md5, ``reports/metrics.json`` and weights. Only the
  MLflow run ids in metrics.json differ (``VOLATILE``); in ``models/best``
  the weights and summary are byte-identical but ``model.json`` records those
  ids and its creation time (``BEST_VOLATILE``), so the folder's md5 in
  ``dvc.lock`` differs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from fixtures_raw import IdxFixture, make_idx_raw, serve
from project_builder import DVC, clean_env, pipeline_project, run_ok

pytestmark = [pytest.mark.slow, pytest.mark.long(80)]

SAFETY_S = 600  # safety nets only; nothing here asserts a duration
# Fields of reports/metrics.json that legitimately differ between two identical executions:
# the MLflow ids of the runs that produced the checkpoint (a new run per execution).
VOLATILE = {"mlflow_run_id", "mlflow_parent_run_id"}
# models/best/model.json records the same ids and its UTC creation time, so the md5 of models/best in
# dvc.lock differs between two executions; the weights (model.safetensors) and summary.txt are byte-identical.
BEST_VOLATILE = {"mlflow_run_id", "mlflow_parent_run_id", "created"}
# Slow enough per epoch that a kill after epoch 1 lands mid-run, small enough for a tiny test.
PARAMS = {"model": "fashion_tutorial", "lr": 0.01, "batch_size": 10, "epochs": 4, "patience": 4}


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def outputs(project: Path) -> dict[str, str]:
    """Everything train writes, plus the models/ folder's own entries (no stray temp folders)."""
    digest = {f"models/best/{k}": v for k, v in tree_digest(project / "models" / "best").items()}
    digest.update({f"reports/{k}": v for k, v in tree_digest(project / "reports").items()})
    digest["models/"] = ",".join(sorted(p.name for p in (project / "models").iterdir()))
    return digest


def lock_md5(project: Path, path: str, stage: str = "train") -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    return next(out["md5"] for out in lock["stages"][stage]["outs"] if out["path"] == path)


def set_params(project: Path, **changes) -> None:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw.update(changes)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def running_child(db: Path) -> tuple[str, str, int] | None:
    """(child run id, parent run id, pid) of a RUNNING child run that has logged epoch 1, else None."""
    query = """
        SELECT r.run_uuid, parent.value, pid.value FROM runs r
        JOIN tags role ON role.run_uuid = r.run_uuid AND role.key = 'cnnpipe.role' AND role.value = 'child'
        JOIN tags parent ON parent.run_uuid = r.run_uuid AND parent.key = 'mlflow.parentRunId'
        JOIN tags pid ON pid.run_uuid = r.run_uuid AND pid.key = 'cnnpipe.pid'
        JOIN metrics m ON m.run_uuid = r.run_uuid AND m.key = 'val_loss' AND m.step = 1
        WHERE r.status = 'RUNNING'
    """
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            row = conn.execute(query).fetchone()
    except sqlite3.Error:
        return None
    return (row[0], row[1], int(row[2])) if row else None


def default_sigint() -> None:
    """Ctrl-C as in a terminal, even when the test runner was started with SIGINT ignored (inherited)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def repro_and_signal(project: Path, sig: int) -> tuple[subprocess.CompletedProcess[str], tuple[str, str, int]]:
    """``dvc repro``; once a child run has logged epoch 1, send ``sig`` to the train stage process."""
    proc = subprocess.Popen([DVC, "repro"], cwd=project, env=clean_env(project), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + SAFETY_S
        while (found := running_child(project / "mlflow.db")) is None:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"dvc repro ended before the first epoch was logged:\n{out[-3000:]}\n{err[-3000:]}")
            assert time.monotonic() < deadline, "no epoch was logged"
            time.sleep(0.05)
        os.kill(found[2], sig)
        out, err = proc.communicate(timeout=SAFETY_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), found


@dataclass
class Baseline:
    project: Path
    raw: IdxFixture
    mirror: str
    metrics: dict
    best_md5: str
    best_files: dict[str, bytes]
    prepared_md5: str


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Baseline]:
    base = tmp_path_factory.mktemp("faults-pipeline")
    raw = make_idx_raw(base / "www", n_train=1000, n_test=100)
    with contextlib.contextmanager(serve)(raw.folder) as server:
        project = pipeline_project(base / "a", server.url, raw.checksums, params=PARAMS)
        run_ok([DVC, "repro", "evaluate"], project, timeout=SAFETY_S)  # plots: read by no test here
        metrics = json.loads((project / "reports" / "metrics.json").read_text())
        best = {p.name: p.read_bytes() for p in (project / "models" / "best").iterdir()}
        yield Baseline(project, raw, server.url, metrics, lock_md5(project, "models/best"), best,
                       lock_md5(project, "data/prepared", stage="prepare"))


def mlflow_client(project: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def test_sigkill_mid_epoch_keeps_models_best_then_repro_completes(baseline: Baseline) -> None:
    project = baseline.project
    before = outputs(project)
    lock_before = (project / "dvc.lock").read_text()
    set_params(project, lr=0.003)

    killed, (child, parent, pid) = repro_and_signal(project, signal.SIGKILL)
    assert killed.returncode != 0
    assert "failed to reproduce 'train'" in killed.stdout + killed.stderr
    assert outputs(project) == before  # byte-identical, and no temp folder left in models/
    assert (project / "dvc.lock").read_text() == lock_before  # DVC did not record the killed train
    client = mlflow_client(project)
    assert client.get_run(child).info.status == "RUNNING"  # nobody was left to close it ...
    assert client.get_run(parent).info.status == "RUNNING"

    again = run_ok([DVC, "repro", "train"], project, timeout=SAFETY_S)
    assert "mlflow: marked 2 stale RUNNING run(s) of dead processes as KILLED" in again.stdout
    assert re.search(r"search: 1 trial\(s\), exhaustive; .*, 1 resumed", again.stdout), again.stdout[:2000]
    resumed_at = re.search(r"resumed model=fashion_tutorial at epoch (\d+)/4", again.stdout)
    assert resumed_at, again.stdout
    # Only the lost epochs were trained, logged into the same child run (reopened, now FINISHED).
    trained = re.findall(r"\[model=fashion_tutorial\] epoch (\d+)/4", again.stdout)
    assert trained == [str(e) for e in range(int(resumed_at.group(1)) + 1, 5)]
    run = client.get_run(parent)
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"].startswith(f"stale: process {pid} on ")
    run = client.get_run(child)
    assert run.info.status == "FINISHED" and run.data.tags["cnnpipe.resumed_at_epoch"] == resumed_at.group(1)
    assert sorted(m.step for m in client.get_metric_history(child, "val_loss")) == [1, 2, 3, 4]
    after = outputs(project)
    assert after["models/"] == before["models/"]  # no temp folder left behind
    assert after["models/best/model.safetensors"] != before["models/best/model.safetensors"]  # replaced, whole
    sidecar = json.loads((project / "models" / "best" / "model.json").read_text())
    assert sidecar["params"]["lr"] == 0.003
    assert lock_md5(project, "models/best") != baseline.best_md5
    assert "Data and pipelines are up to date." in run_ok([DVC, "status", "train"], project).stdout
    # The resumed run ends bit-for-bit like an uninterrupted one: retrain it from scratch and compare.
    resumed_weights = (project / "models" / "best" / "model.safetensors").read_bytes()
    resumed_grid = pd.read_csv(project / "reports" / "grid.csv")
    run_ok(["python", "stages/train.py", "--no-cache"], project, timeout=SAFETY_S)
    assert (project / "models" / "best" / "model.safetensors").read_bytes() == resumed_weights
    straight_grid = pd.read_csv(project / "reports" / "grid.csv")
    for column in ("best_epoch", "epochs_run", "val_loss", "val_top1", "val_top5", "status", "stop_reason"):
        assert list(straight_grid[column]) == list(resumed_grid[column]), column


def test_sigint_stops_cleanly_marks_runs_killed_and_keeps_models_best(baseline: Baseline) -> None:
    project = baseline.project
    before = outputs(project)
    lock_before = (project / "dvc.lock").read_text()
    set_params(project, lr=0.02)

    stopped, (child, parent, _) = repro_and_signal(project, signal.SIGINT)
    assert stopped.returncode != 0
    text = stopped.stdout + stopped.stderr
    assert "interrupted: stopped cleanly (Ctrl-C); no output was replaced" in text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert "exited with 130" in text  # the stage's own exit code, as DVC reports it
    assert outputs(project) == before
    assert (project / "dvc.lock").read_text() == lock_before
    client = mlflow_client(project)
    for run_id in (child, parent):  # closed by the stage itself, not left for the next start
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert "interrupted (Ctrl-C)" in run.data.tags["failure_reason"]


def test_two_fresh_projects_with_the_same_params_give_the_same_results(baseline: Baseline, tmp_path: Path) -> None:
    with contextlib.contextmanager(serve)(baseline.raw.folder) as server:
        other = pipeline_project(tmp_path / "b", server.url, baseline.raw.checksums, params=PARAMS)
        run_ok([DVC, "repro", "evaluate"], other, timeout=SAFETY_S)  # what is compared: prepare, train, evaluate
    assert lock_md5(other, "data/prepared", stage="prepare") == baseline.prepared_md5
    metrics = json.loads((other / "reports" / "metrics.json").read_text())
    assert set(metrics) == set(baseline.metrics)
    differing = {key for key in metrics if metrics[key] != baseline.metrics[key]}
    assert differing == VOLATILE, {k: (baseline.metrics[k], metrics[k]) for k in differing}
    # models/best: the weights are bit-identical; the sidecar differs only in the MLflow ids, which is
    # why the folder's md5 in dvc.lock differs between two tracked executions (see BEST_VOLATILE).
    best = {p.name: p.read_bytes() for p in (other / "models" / "best").iterdir()}
    assert set(best) == set(baseline.best_files)
    for name, blob in best.items():
        if name != "model.json":
            assert blob == baseline.best_files[name], name
    ours, theirs = json.loads(best["model.json"]), json.loads(baseline.best_files["model.json"])
    assert {k for k in ours if ours[k] != theirs.get(k)} == BEST_VOLATILE
    assert {k: v for k, v in ours.items() if k not in BEST_VOLATILE} == \
        {k: v for k, v in theirs.items() if k not in BEST_VOLATILE}
    assert lock_md5(other, "models/best") != baseline.best_md5  # documented: the ids are in model.json
