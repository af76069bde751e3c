"""Tracking faults: the MLflow server goes away in the middle of a grid.

A real ``mlflow server`` (sqlite backend in a temp folder, loopback port, its
own process group) tracks a real ``stages/train.py``. Once the first run's
first epoch is in the server's database, the whole server group is killed
with SIGKILL. The stage waits for that by construction, not by luck of the
machine's load: it runs through ``overlap_gate.py`` (a test helper), whose
stdout holds the first per-epoch line -- printed right after that epoch was
logged -- until a second marker is in the gate folder, and the test writes
that marker only once the server is dead. So the kill always lands inside
the first run, with its later epochs and the whole second run still to go.
Promised behaviour: training goes on and finishes,
``models/best/`` and ``reports/`` are written, the loss of the store is
reported in one ``error:`` line, and the stage exits non-zero so DVC does not
lock a half-logged execution as done. The unreachable-at-start case lives in
``test_train_stage.py``. Also here: a Ctrl-C that lands inside an MLflow call
(the sqlite store must stay writable so the parent run still ends KILLED).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from project_builder import BIN, stage_project
from test_mlflow_server import free_port, serving, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.long(40)]

SAFETY_S = 300  # a safety net only; nothing here asserts a duration
GATE = Path(__file__).resolve().parent / "overlap_gate.py"  # holds the stage at its first epoch line


def first_epoch_logged(db: Path) -> bool:
    """True once a child's epoch-1 ``val_loss`` is in the server's sqlite store."""
    if not db.is_file():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            row = conn.execute("SELECT count(*) FROM metrics WHERE key = 'val_loss' AND step = 1").fetchone()
    except sqlite3.Error:  # tables not created yet, or a write in progress
        return False
    return bool(row and row[0])


def test_server_killed_mid_grid_training_finishes_outputs_written_exit_nonzero(tmp_path: Path) -> None:
    # 4 epochs x 2 runs (stage_project's 300 synthetic train images): the gate holds the stage after the
    # first epoch of the first run is logged, so the kill lands with the rest of the grid still to go
    work, root = stage_project(tmp_path / "proj", lr=[0.05, 0.01], epochs=4, batch_size=50,
                               mlflow={"enabled": True, "tracking_uri": None, "experiment": "cnnpipe",
                                       "registered_model": None, "log_layer_stats": False},
                               grid={"workers": 1, "backend": "local", "ray_address": None, "max_runs": 64,
                                     "cache": False})
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    db = server_dir / "mlflow.db"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
               "--artifacts-destination", str(server_dir / "artifacts"), "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1"]
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CNNPIPE_DEBUG", "DVC_EXP_NAME")}
    # No MLFLOW_HTTP_REQUEST_MAX_RETRIES here: the stage's own client defaults (tracking.HTTP_CLIENT_DEFAULTS)
    # must keep a dead server from stalling training.
    env.update({"DVC_ROOT": str(root), "DVC_STAGE": "train", "MLFLOW_DISABLE_TELEMETRY": "true",
                "MLFLOW_TRACKING_URI": base, "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"})
    # The stage's marker appears when its first epoch line is held; the test's own marker releases it.
    gate = tmp_path / "gate"
    env.update({"OVERLAP_GATE_DIR": str(gate), "OVERLAP_GATE_PARTIES": "2"})
    with serving(command, server_dir, log) as server:
        wait_healthy(base, server, log)
        stage = subprocess.Popen([sys.executable, str(GATE), "stages/train.py"], cwd=work, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + SAFETY_S
            while not (first_epoch_logged(db) and gate.is_dir() and any(gate.iterdir())):
                assert stage.poll() is None, f"stage ended before its first epoch was logged: {stage.communicate()}"
                assert time.monotonic() < deadline, "no epoch reached the server"
                time.sleep(0.05)
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
            (gate / "test").write_text("the server is dead")  # the stage's first epoch line returns: training goes on
            out, err = stage.communicate(timeout=SAFETY_S)
        finally:
            if stage.poll() is None:
                stage.kill()
                stage.wait()

    assert stage.returncode == 1, err[-3000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    assert errors[0].startswith("error: MLflow ") and f"failed at {base}" in errors[0]
    assert "training finished and models/best/ and reports/ were written" in errors[0]
    # the moment of loss is announced once, and training went on
    lost = [line for line in err.splitlines() if line.startswith("mlflow: ")]
    assert len(lost) == 1 and lost[0].endswith("training goes on without tracking"), err[-3000:]

    grid = pd.read_csv(work / "reports" / "grid.csv", dtype={"mlflow_run_id": str})
    assert list(grid["status"]) == ["finished", "finished"], grid.to_string()
    assert list(grid["epochs_run"]) == [4, 4]  # both runs trained to the end, the second one after the loss
    assert isinstance(grid["mlflow_run_id"][0], str) and pd.isna(grid["mlflow_run_id"][1])  # logging stopped, training did not
    history = pd.read_csv(work / "reports" / "history.csv")
    assert len(history) == 8
    train = json.loads((work / "reports" / "train.json").read_text())
    assert train["runs_total"] == 2 and train["runs_failed"] == 0
    sidecar = json.loads((work / "models" / "best" / "model.json").read_text())
    assert sidecar["run_id"] == train["run_id"]
    assert "run 2/2 lr=0.01: best val_loss" in out


@pytest.mark.parametrize("keep_going", [False, True])
def test_a_lost_store_raises_for_later_stages_and_is_remembered_by_train(monkeypatch, keep_going: bool) -> None:
    """evaluate/plots (keep_going=False) fail in one line; train's tracker remembers and skips every later call."""
    from cnnpipe.util.errors import TrackingError
    from cnnpipe.tracking.runs import MlflowTracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tracker = MlflowTracker(uri=uri, experiment_id="1", parent_run_id="p" * 32, keep_going=keep_going)
    if not keep_going:
        with pytest.raises(TrackingError, match=rf"^MLflow log_batch failed at {uri}: .*; check the store"):
            tracker.log_epoch("c" * 32, 1, {"val_loss": 0.5})
        assert tracker.lost is None
        return
    tracker.log_epoch("c" * 32, 1, {"val_loss": 0.5})
    assert tracker.lost is not None and tracker.lost.startswith(f"MLflow log_batch failed at {uri}")
    first = tracker.lost

    class NoMoreCalls:
        def __getattr__(self, name: str):
            return lambda *args, **kwargs: pytest.fail(f"MLflow {name} called after the store was lost")

    tracker._client = NoMoreCalls()
    assert tracker.start_child("lr=0.1", params={"lr": 0.1}, tags={}) is None
    tracker.end_child("c" * 32, status="FINISHED", metrics={"best_val_loss": 0.4})
    tracker.end_parent("FINISHED")
    assert tracker.lost == first


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_inside_an_mlflow_call_waits_for_it_then_the_parent_ends_killed(tmp_path: Path, presses: int) -> None:
    """One Ctrl-C mid-call is held until the call returns (the store stays writable: the parent ends
    KILLED at once, not after ~100 s of "database is locked"); a second one interrupts the call itself."""
    from mlflow import MlflowClient

    from cnnpipe.params.sections import MlflowParams
    from cnnpipe.tracking.runs import open_tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = open_tracker(MlflowParams(tracking_uri=uri, experiment="ctrl-c-mid-call"))
    child = tracker.start_child("lr=0.1", params={"lr": 0.1}, tags={})

    def interrupted_log() -> None:
        for _ in range(presses):
            os.kill(os.getpid(), signal.SIGINT)
        tracker.client.log_metric(child, "val_loss", 0.5, step=1)  # the write the Ctrl-C landed in

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with pytest.raises(KeyboardInterrupt), tracker.running():
            tracker.call("log_metric", interrupted_log)
    finally:
        signal.signal(signal.SIGINT, previous)
    client = MlflowClient(uri)
    logged = [m.value for m in client.get_metric_history(child, "val_loss")]
    assert logged == ([0.5] if presses == 1 else [])
    assert signal.getsignal(signal.SIGINT) is previous  # the held handler never leaks
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "KILLED"
    assert parent.data.tags["failure_reason"] == "interrupted (Ctrl-C)"
