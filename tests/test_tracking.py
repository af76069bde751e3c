"""cnnpipe.tracking against a real MLflow sqlite store under tmp_path.

The first run on a new store costs ~4 s (table creation), so the tests that
only need *a* store share one per module (``store``); each test makes its own
experiment to stay independent. The only stand-in is a loopback HTTP server
(the network edge) for the reachability check.
"""

from __future__ import annotations

import http.server
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from cnnpipe.util.errors import TrackingError
from cnnpipe.params.sections import MlflowParams
from cnnpipe.tracking.runs import NullTracker, open_tracker, parent_run_name
from cnnpipe.serving.register import register_checkpoint
from cnnpipe.tracking.later_stages import log_evaluation
from cnnpipe.tracking.connection import check_reachable, preflight, resolve_store, resolve_target

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One sqlite store for the module (its tables are created once)."""
    root = tmp_path_factory.mktemp("mlstore")
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}").search_experiments()
    return root


def settings(store: Path, experiment: str, **extra) -> MlflowParams:
    return MlflowParams(tracking_uri=f"sqlite:///{store / 'mlflow.db'}", experiment=experiment, **extra)


def client_for(store: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- where the store is


def test_default_store_is_anchored_at_dvc_root_not_cwd(tmp_path, monkeypatch):
    root, elsewhere = tmp_path / "root", tmp_path / "exp-copy"
    root.mkdir()
    elsewhere.mkdir()
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.chdir(elsewhere)
    target = resolve_target(None)
    assert target.uri == f"sqlite:///{root.resolve() / 'mlflow.db'}"
    assert target.artifact_location == str(root.resolve() / "mlartifacts")
    assert target.origin == "default"


def test_relative_sqlite_uri_is_anchored_at_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir("/")
    target = resolve_target("sqlite:///stores/runs.db")
    assert target.uri == f"sqlite:///{tmp_path.resolve() / 'stores' / 'runs.db'}"
    assert target.artifact_location == str(tmp_path.resolve() / "stores" / "mlartifacts")


def test_bare_relative_store_folder_is_anchored_at_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir("/")
    assert resolve_target("mlruns").uri == str(tmp_path.resolve() / "mlruns")


def test_env_uri_wins_over_params(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999/")
    target = resolve_target("sqlite:////tmp/other.db", root=tmp_path)
    assert target.uri == "http://127.0.0.1:5999"
    assert target.origin == "MLFLOW_TRACKING_URI"
    assert target.artifact_location is None


def test_unreachable_server_is_one_line_tracking_error():
    settings_ = MlflowParams(tracking_uri=f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(TrackingError) as info:
        preflight(settings_)
    message = str(info.value)
    assert "\n" not in message
    assert "unreachable" in message and "mlflow.tracking_uri in params.yaml" in message
    assert "mlflow.enabled: false" in message


def test_reachable_server_passes_preflight_even_without_health_route():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        target = resolve_target(f"http://127.0.0.1:{server.server_port}")
        check_reachable(target)  # a 404 still proves the server is there
    finally:
        server.shutdown()


def test_disabled_tracking_never_imports_mlflow(tmp_path):
    code = (
        "import sys\n"
        "from cnnpipe.params.sections import MlflowParams\n"
        "from cnnpipe.tracking import calls, runs, later_stages, model_registry, connection as store\n"
        "from cnnpipe.reports import train_files, layer_histograms\n"
        "from cnnpipe.serving import publish, register\n"
        "from cnnpipe.search import runner, log, trial\n"
        "t = runs.open_tracker(MlflowParams(enabled=False))\n"
        "assert type(t) is runs.NullTracker and store.preflight(MlflowParams(enabled=False)) is None\n"
        "print('mlflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_null_tracker_is_a_no_op():
    tracker = NullTracker()
    assert tracker.start_child("x", params={}, tags={}) is None
    with tracker.running():
        tracker.log_epoch(None, 1, {"val_loss": 1.0})
    assert register_checkpoint(tracker, None, Path(".")) is None


# --------------------------------------------------------------------------- runs


def test_parent_run_is_named_after_the_dvc_experiment(store, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-lucky-fox")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    monkeypatch.setenv("DVC_STAGE", "train")
    tracker = open_tracker(settings(store, "naming"), params={"lr": [0.1, 0.01]}, tags={"dataset": "mnist"})
    with tracker.running():
        pass
    run = client_for(store).get_run(tracker.parent_run_id)
    assert run.info.run_name == "exp-lucky-fox"
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["cnnpipe.role"] == "parent"
    assert tags["dvc.exp_name"] == "exp-lucky-fox" and tags["dvc.exp_baseline_rev"] == "a" * 40
    assert tags["dvc.stage"] == "train" and tags["dataset"] == "mnist"
    assert tags["cnnpipe.pid"] == str(os.getpid())
    assert run.data.params["lr"] == "[0.1, 0.01]"


def test_parent_run_name_defaults_to_utc_timestamp():
    assert parent_run_name().startswith("train-20") and parent_run_name().endswith("Z")


def test_stale_running_runs_of_dead_processes_are_killed(store):
    client = client_for(store)
    tracker = open_tracker(settings(store, "stale"))  # creates the experiment
    tracker.end_parent()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    exp = tracker.experiment_id
    stale = client.create_run(exp, tags={"cnnpipe.pid": str(dead.pid), "cnnpipe.host": host}).info.run_id
    alive = client.create_run(exp, tags={"cnnpipe.pid": str(os.getpid()), "cnnpipe.host": host}).info.run_id
    foreign = client.create_run(exp, tags={"cnnpipe.pid": str(dead.pid), "cnnpipe.host": host + "-other"}).info.run_id

    again = open_tracker(settings(store, "stale"))
    again.end_parent()
    assert client.get_run(stale).info.status == "KILLED"
    assert "is gone" in client.get_run(stale).data.tags["failure_reason"]
    assert client.get_run(alive).info.status == "RUNNING"
    assert client.get_run(foreign).info.status == "RUNNING"


def test_children_nest_log_per_epoch_batches_and_end_with_status(store):
    client = client_for(store)
    tracker = open_tracker(settings(store, "children"))
    with tracker.running():
        ok = tracker.start_child("lr=0.1", params={"lr": 0.1, "model": "tiny"}, tags={"cnnpipe.run_id": "abc"})
        for epoch in (1, 2, 3):
            tracker.log_epoch(ok, epoch, {"val_loss": 1.0 / epoch, "grad_norm/0": 0.5})
        tracker.end_child(ok, status="FINISHED", metrics={"best_val_loss": 1 / 3}, texts={"model_summary.txt": "model tiny"})
        bad = tracker.start_child("lr=1e6", params={"lr": 1e6}, tags={})
        tracker.log_epoch(bad, 1, {"val_loss": float("nan")})
        tracker.end_child(bad, status="FAILED", reason="diverged: loss is nan at epoch 1 batch 2")
    history = client.get_metric_history(ok, "val_loss")
    assert [(m.step, round(m.value, 4)) for m in sorted(history, key=lambda m: m.step)] == [(1, 1.0), (2, 0.5), (3, 0.3333)]
    assert len(client.get_metric_history(ok, "grad_norm/0")) == 3
    run = client.get_run(ok)
    assert run.data.tags["mlflow.parentRunId"] == tracker.parent_run_id
    assert run.data.tags["cnnpipe.role"] == "child" and run.info.status == "FINISHED"
    assert run.data.params == {"lr": "0.1", "model": "tiny"}
    assert [a.path for a in client.list_artifacts(ok)] == ["model_summary.txt"]
    failed = client.get_run(bad)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["failure_reason"].startswith("diverged: loss is nan")
    assert client.get_run(tracker.parent_run_id).info.status == "FINISHED"


def test_the_dataset_is_the_input_of_the_parent_and_every_child(store):
    """The MLflow runs table's Dataset column: name, the prepared data's digest, and its source."""
    client = client_for(store)
    opened = {}
    for digest in ("0123456789abcdef", "fedcba9876543210"):  # the same dataset prepared twice, differently
        tracker = open_tracker(settings(store, "datasets"), dataset=("fashion-mnist", digest, "data/prepared"))
        with tracker.running():
            worker = pickle.loads(pickle.dumps(tracker))  # a process-pool worker starts children too
            opened[digest] = [tracker.parent_run_id, tracker.start_child("lr=0.1", params={"lr": 0.1}, tags={}),
                              worker.start_child("lr=0.01", params={"lr": 0.01}, tags={})]
    for digest, run_ids in opened.items():
        for run_id in run_ids:
            inputs = client.get_run(run_id).inputs.dataset_inputs
            assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [("fashion-mnist", digest)]
            assert json.loads(inputs[0].dataset.source) == {"uri": "data/prepared"}
            assert {t.key: t.value for t in inputs[0].tags} == {"mlflow.data.context": "train"}
    plain = open_tracker(settings(store, "datasets"))  # no dataset given: no input logged
    with plain.running():
        child = plain.start_child("x", params={}, tags={})
    assert client.get_run(child).inputs.dataset_inputs == []


def test_interrupt_marks_parent_killed_and_propagates(store):
    client = client_for(store)
    tracker = open_tracker(settings(store, "interrupt"))
    with pytest.raises(KeyboardInterrupt), tracker.running():
        raise KeyboardInterrupt
    assert client.get_run(tracker.parent_run_id).info.status == "KILLED"


def test_an_error_marks_parent_failed_with_reason(store):
    client = client_for(store)
    tracker = open_tracker(settings(store, "error"))
    with pytest.raises(RuntimeError), tracker.running():
        raise RuntimeError("disk full")
    run = client.get_run(tracker.parent_run_id)
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"] == "RuntimeError: disk full"


def tiny_checkpoint(folder: Path, seed: int) -> Path:
    """A real (untrained) checkpoint of the TINY net; ``seed`` decides its weights."""
    import torch
    from synthetic import TINY

    from cnnpipe.models.checkpoint import save_checkpoint
    from cnnpipe.models.build import build_model

    torch.manual_seed(seed)
    model = build_model(TINY, (1, 28, 28), 10)
    save_checkpoint(folder, model, {"layers": TINY, "in_shape": [1, 28, 28], "num_classes": 10,
                                    "classes": [f"c{i}" for i in range(10)], "mean": [0.5], "std": [0.25]})
    return folder


@pytest.mark.slow  # the first pyfunc save in a process: MLflow scans every installed package
def test_model_is_a_pyfunc_from_code_registered_once_per_weights(store, tmp_path, monkeypatch):
    client = client_for(store)
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-kiwi")  # as `dvc exp run` sets it
    tracker = open_tracker(settings(store, "registry", registered_model="tiny-classifier"))
    first_ckpt, other_ckpt = tiny_checkpoint(tmp_path / "a", seed=1), tiny_checkpoint(tmp_path / "b", seed=2)
    with tracker.running():
        child = tracker.start_child("only", params={}, tags={})
        first = register_checkpoint(tracker, child, first_ckpt, tags={"run_id": "abc"})
        again = register_checkpoint(tracker, child, first_ckpt)  # byte-identical weights: no new version
        other = register_checkpoint(tracker, child, other_ckpt)
        tracker.end_child(child, status="FINISHED")
    assert (first, again, other) == ("tiny-classifier/1", "tiny-classifier/1", "tiny-classifier/2")
    version = client.get_model_version("tiny-classifier", "1")
    sidecar = json.loads((first_ckpt / "model.json").read_text())
    assert version.run_id == child and version.source.endswith("/model")
    assert version.tags == {"run_id": "abc", "cnnpipe.weights_sha256": sidecar["weights_sha256"],
                            "git.commit": tracker.base_tags["mlflow.source.git.commit"], "dvc.exp_name": "tidy-kiwi"}
    assert client.get_registered_model("tiny-classifier").aliases == {"champion": 2}  # follows the last execution
    logged = {a.path for a in client.list_artifacts(child, "model")}
    assert {"model/MLmodel", "model/pyfunc_model.py", "model/artifacts", "model/code",
            "model/requirements.txt"} <= logged
    assert {a.path for a in client.list_artifacts(child, "model/artifacts/checkpoint")} == {
        "model/artifacts/checkpoint/model.json", "model/artifacts/checkpoint/model.safetensors"}
    local = Path(client.download_artifacts(child, "model", str(tmp_path / "dl")))
    assert not [p for p in local.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt", ".pth")]  # nothing pickled
    mlmodel = (local / "MLmodel").read_text()
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel and "python_model.pkl" not in mlmodel


@pytest.mark.slow  # the first pyfunc save in a process: MLflow scans every installed package
def test_queued_experiments_do_not_move_the_champion(store, tmp_path, monkeypatch):
    client = client_for(store)
    tracker = open_tracker(settings(store, "queued", registered_model="queued-classifier"))
    with tracker.running():
        child = tracker.start_child("only", params={}, tags={})
        assert register_checkpoint(tracker, child, tiny_checkpoint(tmp_path / "a", seed=3)) == "queued-classifier/1"
        monkeypatch.setenv("DVC_ROOT", str(tmp_path))  # the stage now runs in a temp copy below the repo
        monkeypatch.chdir(tmp_path / "a")
        assert register_checkpoint(tracker, child, tiny_checkpoint(tmp_path / "b", seed=4)) == "queued-classifier/2"
        tracker.end_child(child, status="FINISHED")
    assert client.get_registered_model("queued-classifier").aliases == {"champion": 1}


def test_experiment_opens_as_model_training_in_the_ui(store):
    from cnnpipe.tracking.connection import EXPERIMENT_KIND

    client = client_for(store)
    tracker = open_tracker(settings(store, "kind"))
    tracker.end_parent()
    assert client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert EXPERIMENT_KIND == ("mlflow.experimentKind", "custom_model_development")
    # an experiment an older cnnpipe created without a kind gets it; a kind the user chose stays
    bare = client.create_experiment("kind-bare")
    chosen = client.create_experiment("kind-chosen", tags={"mlflow.experimentKind": "genai_development"})
    for name in ("kind-bare", "kind-chosen"):
        open_tracker(settings(store, name)).end_parent()
    assert client.get_experiment(bare).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_ui_url_opens_the_experiment_in_the_model_training_view(store):
    from cnnpipe.tracking.connection import ui_url

    tracker = open_tracker(settings(store, "ui-url"))
    tracker.end_parent()
    target = resolve_target(f"sqlite:///{store / 'mlflow.db'}")
    base = "http://127.0.0.1:5000"
    assert ui_url(target, "ui-url", base) == f"{base}/#/experiments/{tracker.experiment_id}?workflowType=machine_learning"
    assert ui_url(target, "never-created", base) == f"{base}/#/?workflowType=machine_learning"
    missing = resolve_target(f"sqlite:///{store / 'absent' / 'mlflow.db'}")
    assert ui_url(missing, "ui-url", base) == f"{base}/#/?workflowType=machine_learning"


def test_tracker_pickles_for_worker_processes(store):
    tracker = open_tracker(settings(store, "pickle"))
    clone = pickle.loads(pickle.dumps(tracker))
    assert clone.parent_run_id == tracker.parent_run_id and clone._client is None
    child = clone.start_child("from-a-worker", params={}, tags={})
    clone.end_child(child, status="FINISHED")
    tracker.end_parent()
    assert client_for(store).get_run(child).data.tags["mlflow.parentRunId"] == tracker.parent_run_id


# --------------------------------------------------------------------------- later stages


def test_resolve_store_names_uri_and_artifact_root(tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    store = resolve_store(MlflowParams())
    assert store.tracking_uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert store.artifact_location == str(tmp_path.resolve() / "mlartifacts")


def test_log_evaluation_adds_metrics_to_child_and_parent_and_files_to_parent(store, tmp_path):
    client = client_for(store)
    tracker = open_tracker(settings(store, "evaluation"))
    child = tracker.start_child("best", params={}, tags={})
    tracker.end_child(child, status="FINISHED")
    tracker.end_parent()
    report = tmp_path / "metrics.json"
    report.write_text("{}")
    assert log_evaluation(settings(store, "evaluation"), parent_run_id=tracker.parent_run_id, child_run_id=child,
                          metrics={"test_top1": 0.9}, files=[report], artifact_path="evaluation")
    for run_id in (child, tracker.parent_run_id):
        assert client.get_run(run_id).data.metrics["test_top1"] == 0.9
    assert [a.path for a in client.list_artifacts(tracker.parent_run_id, "evaluation")] == ["evaluation/metrics.json"]
    assert client.get_run(tracker.parent_run_id).info.status == "FINISHED"  # logging did not reopen it


def test_log_evaluation_into_a_store_without_those_runs_is_a_note_not_an_error(store, capsys):
    assert log_evaluation(settings(store, "evaluation"), parent_run_id="0" * 32, metrics={"test_top1": 1.0}) is False
    assert "is not in" in capsys.readouterr().out
    assert log_evaluation(MlflowParams(enabled=False), parent_run_id="x") is False
