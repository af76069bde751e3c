"""The grid runner with the real engine and a real MLflow sqlite store.

Tests that train or open the store are marked slow (the shared 2x2 grid and
the store's table creation take several seconds on a 2-core CPU); selection,
naming and bookkeeping tests run in milliseconds.

Tiny synthetic data (300 train / 100 val images of 1x28x28) and a 4-channel
conv net: a run takes well under a second on a CPU. One store per module
(tables are created once, ~4 s); each test uses its own experiment.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from cnnpipe.reports import train_files
from cnnpipe.serving import publish
from cnnpipe.tracking.runs import NullTracker
from cnnpipe.search.trial import TrainContext
from cnnpipe.search.selection import select_best
from cnnpipe.search.selection import RunRecord
from cnnpipe.search.selection import GridFailed
from cnnpipe.search.payloads import search_definition
from cnnpipe.search.runner import run_search
from cnnpipe.search.search_progress import run_line
from cnnpipe.search.backend_choice import make_executor
from cnnpipe.search.backend_sequential import SequentialExecutor
from cnnpipe.engine.data import TrainData
from cnnpipe.engine.inference import evaluate_logits
from cnnpipe.engine.records import EpochRecord, RunResult
from cnnpipe.engine.loop import train_run as engine_train_run
from cnnpipe.params.sections import MlflowParams
from cnnpipe.search.space import expand as expand_grid
from cnnpipe.tracking.runs import open_tracker
from synthetic import tiny_params as make_params

EPOCH_METRICS = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "epoch_seconds", "images_per_s")


@pytest.fixture(scope="module")
def data(tiny_prepared) -> TrainData:
    return TrainData.load(tiny_prepared, splits=("train", "val"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlstore")


def mlflow_settings(store: Path, experiment: str, **extra) -> MlflowParams:
    return MlflowParams(tracking_uri=f"sqlite:///{store / 'mlflow.db'}", experiment=experiment, **extra)


def client_for(store: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def children_of(client, tracker) -> dict:
    runs = client.search_runs([tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'")
    return {run.info.run_name: run for run in runs}


@pytest.fixture(scope="module")
def tracked_grid(data, store):
    """A 2x2 grid (lr x batch_size) trained once, tracked in MLflow, for the tests below."""
    params = make_params()
    tracker = open_tracker(mlflow_settings(store, "grid-2x2"), params=search_definition(params))
    lines: list[str] = []
    with tracker.running():
        ctx = TrainContext(data=data, tracker=tracker, layer_stats=True, progress=False)
        records = run_search(expand_grid(params), ctx, select_by="val_loss", report=lines.append)
    return params, tracker, records, lines


# --------------------------------------------------------------------------- expansion and selection (no training)


def test_expand_grid_names_every_combination_in_params_order():
    configs = expand_grid(make_params())
    assert [c.name for c in configs] == [
        "lr=0.05,batch_size=32", "lr=0.05,batch_size=64", "lr=0.01,batch_size=32", "lr=0.01,batch_size=64",
    ]
    assert len({c.run_id for c in configs}) == 4 and all(len(c.run_id) == 10 for c in configs)
    assert configs[1].values.lr == 0.05 and configs[1].values.batch_size == 64
    assert expand_grid(make_params())[2].run_id == configs[2].run_id  # stable ids


def record(index: int, status: str, val_loss: float, val_top1: float) -> RunRecord:
    cfg = expand_grid(make_params(lr=[0.1, 0.01, 0.001, 0.0001], batch_size=32))[index - 1]
    epoch = EpochRecord(1, 1.0, 0.5, val_loss, val_top1, 0.9, 0.01, 1.0, 100.0)
    result = RunResult(cfg.run_id, status, "max_epochs" if status == "finished" else "diverged: loss is nan at epoch 2 batch 1",
                       1, epoch, [epoch], 1, 1.0, 100.0, torch.nn.Linear(1, 1), "cpu")
    return RunRecord(index, cfg, result)


def test_select_best_by_val_loss_or_val_top1_among_usable_runs():
    failed = record(3, "failed", 0.10, 0.99)
    failed.result = RunResult.failed(failed.cfg.run_id, "RuntimeError: boom")
    records = [record(1, "finished", 0.50, 0.80), record(2, "finished", 0.40, 0.70), failed,
               record(4, "finished", 0.45, 0.85)]
    assert select_best(records, "val_loss").index == 2
    assert select_best(records, "val_top1").index == 4


def test_a_run_that_diverged_after_a_finite_epoch_keeps_its_best_epoch_as_a_candidate():
    records = [record(1, "finished", 0.50, 0.80), record(2, "diverged", 0.30, 0.90)]
    assert records[1].ok and select_best(records, "val_loss").index == 2
    never_finite = record(3, "diverged", math.nan, 0.1)
    assert not never_finite.ok


def test_select_best_breaks_ties_deterministically():
    records = [record(1, "finished", 0.40, 0.70), record(2, "finished", 0.40, 0.75), record(3, "finished", 0.40, 0.75)]
    assert select_best(records, "val_loss").index == 2
    assert select_best(records, "val_top1").index == 2


def test_all_failed_is_one_line_grid_error():
    records = [record(1, "diverged", math.nan, 0.1), record(2, "diverged", math.nan, 0.1)]
    with pytest.raises(GridFailed) as info:
        select_best(records, "val_loss")
    message = str(info.value)
    assert "\n" not in message and message.startswith("all 2 grid runs failed")
    assert "lr=0.1: diverged: loss is nan at epoch 2 batch 1" in message


def test_summary_table_shows_every_axis_value_of_a_27_point_grid_uncut():
    """Rows of a 3x3x3 grid differ in the table: one column per axis, no run name cut to ``...``."""
    configs = expand_grid(make_params(lr=[0.03, 0.003, 0.0003], batch_size=[16, 64, 256],
                                      weight_decay=[0.0, 0.0001, 0.001]))
    epoch = EpochRecord(1, 1.0, 0.5, 0.4, 0.8, 0.9, 0.01, 1.0, 100.0)
    records = [RunRecord(i + 1, cfg, RunResult(cfg.run_id, "finished", "max_epochs", 1, epoch, [epoch], 1, 1.0,
                                               100.0, None, "cpu")) for i, cfg in enumerate(configs)]
    assert len(records) == 27 and max(len(cfg.name) for cfg in configs) > 36  # the old table cut these
    header, *rows, footer = train_files.summary_table(records, records[4], "val_loss").splitlines()
    assert header.split()[:3] == ["lr", "batch_size", "weight_decay"]
    assert "..." not in "\n".join(rows) and len(rows) == 27
    shown = [tuple(row.lstrip("* ").split()[:3]) for row in rows]
    assert len(set(shown)) == 27
    assert shown == [(str(c.values.lr), str(c.values.batch_size), str(c.values.weight_decay)) for c in configs]
    assert rows[4].startswith("*") and sum(row.startswith("*") for row in rows) == 1
    assert footer == f"* selected by val_loss: {configs[4].name} (run {configs[4].run_id})"


def test_progress_line_format():
    ok = record(2, "finished", 0.4, 0.912)
    ok.result.seconds = 41.2
    assert run_line(ok, 8, "val_top1") == "run 2/8 lr=0.01: best val_top1 0.9120 @ epoch 1, 41 s"
    assert run_line(ok, 8, "val_loss") == "run 2/8 lr=0.01: best val_loss 0.4000 (val_top1 0.9120) @ epoch 1, 41 s"
    bad = record(1, "diverged", math.nan, 0.1)
    assert run_line(bad, 8) == "run 1/8 lr=0.1: FAILED (diverged: loss is nan at epoch 2 batch 1), 1 s"


# --------------------------------------------------------------------------- a tracked 2x2 grid


def head_commit() -> str | None:
    out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


@pytest.mark.slow
def test_grid_logs_one_parent_and_a_child_per_run(tracked_grid, store):
    params, tracker, records, lines = tracked_grid
    client = client_for(store)
    runs = client.search_runs([tracker.experiment_id])
    assert len(runs) == 5
    parent = client.get_run(tracker.parent_run_id)
    assert parent.data.tags["cnnpipe.role"] == "parent" and parent.info.status == "FINISHED"
    children = children_of(client, tracker)
    assert sorted(children) == sorted(rec.cfg.name for rec in records)
    assert [rec.mlflow_run_id for rec in records] == [children[rec.cfg.name].info.run_id for rec in records]
    assert lines[0] == "search: 4 trial(s), exhaustive; cache off, 0 resumed"
    ends = [line for line in lines if line.startswith("run ")]
    assert len(ends) == 4 and ends[0].startswith("run 1/4 lr=0.05,batch_size=32: best val_loss ")
    # one line per epoch per run in sequential mode too (what `dvc queue logs -f` follows)
    epochs = [line for line in lines if " epoch " in line and line.startswith("[")]
    assert len(epochs) == 4 * params.training["epochs"][0]
    assert epochs[0].startswith("[lr=0.05,batch_size=32] epoch 1/2: train_loss ")


@pytest.mark.slow
def test_children_have_params_tags_status_and_artifacts(tracked_grid, store, data):
    params, tracker, records, _ = tracked_grid
    client = client_for(store)
    for rec in records:
        run = client.get_run(rec.mlflow_run_id)
        expected = {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in rec.cfg.flat().items()}
        assert {k: v.lower() if v in ("True", "False") else v for k, v in run.data.params.items()} == {**expected, "dataset": "fashion-mnist"}
        tags = run.data.tags
        assert tags["cnnpipe.role"] == "child" and tags["mlflow.parentRunId"] == tracker.parent_run_id
        assert tags["cnnpipe.run_id"] == rec.cfg.run_id and tags["dataset"] == "fashion-mnist"
        assert tags["data_fingerprint"] == data.fingerprint and tags["device"] == "cpu"
        assert tags["cnnpipe.version"] and tags["cnnpipe.host"] and tags["status"] == "finished"
        assert tags.get("mlflow.source.git.commit") == head_commit()
        assert run.info.status == "FINISHED"
        assert run.data.metrics["best_val_loss"] == pytest.approx(rec.result.best.val_loss)
        assert run.data.metrics["best_epoch"] == rec.result.best_epoch
        artifacts = {a.path for a in client.list_artifacts(rec.mlflow_run_id)}
        assert {"model_summary.txt", "history.csv", "layer_histograms.png"} <= artifacts


@pytest.mark.slow
def test_per_epoch_metric_histories_match_the_records(tracked_grid, store):
    _, _, records, _ = tracked_grid
    client = client_for(store)
    rec = records[2]
    for key in EPOCH_METRICS:
        history = sorted(client.get_metric_history(rec.mlflow_run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2]
        assert [m.value for m in history] == pytest.approx([getattr(e, key) for e in rec.result.history])
    layer_keys = [k for k in client.get_run(rec.mlflow_run_id).data.metrics if k.startswith(("weight_norm/", "grad_norm/"))]
    assert "weight_norm/0" in layer_keys and "grad_norm/0" in layer_keys
    assert len(client.get_metric_history(rec.mlflow_run_id, "grad_norm/0")) == 2


@pytest.mark.slow
def test_best_model_round_trips_through_models_best(tracked_grid, store, data, tmp_path):
    from cnnpipe.models.checkpoint import load_checkpoint

    params, tracker, records, _ = tracked_grid
    best = select_best(records, "val_loss")
    tracker.registered_model = "grid-test-model"
    published = publish.publish(records, best, data, tracker, select_by="val_loss",
                                best_dir=tmp_path / "models" / "best", reports_dir=tmp_path / "reports")
    ckpt = load_checkpoint(tmp_path / "models" / "best")
    side = ckpt.sidecar
    assert side["run_id"] == best.cfg.run_id and side["run_name"] == best.cfg.name
    assert side["best_epoch"] == best.result.best_epoch
    assert side["metrics"] == pytest.approx({k: getattr(best.result.best, k) for k in ("val_loss", "val_top1", "val_top5")})
    assert side["mlflow_run_id"] == best.mlflow_run_id and side["mlflow_parent_run_id"] == tracker.parent_run_id
    assert side["mlflow_experiment_id"] == tracker.experiment_id and side["params"] == best.cfg.flat()
    assert (tmp_path / "models" / "best" / "summary.txt").read_text().startswith("model tiny")
    kwargs = {"mean": data.mean, "std": data.std}
    assert torch.equal(evaluate_logits(ckpt.model, data.val.images, **kwargs),
                       evaluate_logits(best.result.model, data.val.images, **kwargs))

    train_json = pd.read_json(tmp_path / "reports" / "train.json", typ="series")
    assert train_json["run_id"] == best.cfg.run_id and train_json["runs_total"] == 4 and train_json["runs_failed"] == 0
    client = client_for(store)
    assert published.model_version == "grid-test-model/1"
    version = client.get_model_version("grid-test-model", "1")
    assert version.run_id == best.mlflow_run_id
    assert {a.path for a in client.list_artifacts(best.mlflow_run_id, "model")} >= {"model/MLmodel", "model/artifacts"}
    assert {a.path for a in client.list_artifacts(best.mlflow_run_id, "model/artifacts/checkpoint")} == {
        "model/artifacts/checkpoint/model.safetensors", "model/artifacts/checkpoint/model.json"}
    parent = client.get_run(tracker.parent_run_id)
    assert parent.data.tags["best_run_id"] == best.cfg.run_id and parent.data.tags["best_mlflow_run_id"] == best.mlflow_run_id
    assert parent.data.params["best_lr"] == str(best.cfg.values.lr)
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best.result.best.val_loss)
    assert {"grid.csv", "train.json", "grid_table.json"} <= {a.path for a in client.list_artifacts(tracker.parent_run_id)}


@pytest.mark.slow
def test_failed_publish_leaves_previous_models_best_untouched(tracked_grid, data, tmp_path):
    _, _, records, _ = tracked_grid
    best = select_best(records, "val_loss")
    good = tmp_path / "models" / "best"
    good.mkdir(parents=True)
    (good / "model.json").write_text("previous good model")
    blocked = tmp_path / "reports"
    blocked.write_text("a file where the reports folder should be")
    blocked_best = tmp_path / "blocked" / "best"
    blocked_best.parent.mkdir()
    blocked_best.parent.chmod(0o500)  # the checkpoint cannot be written: nothing is replaced
    try:
        if not os.access(blocked_best.parent, os.W_OK):  # root can write anywhere: this half needs a plain user
            with pytest.raises(OSError):
                publish.publish(records, best, data, NullTracker(), select_by="val_loss", best_dir=blocked_best,
                                reports_dir=tmp_path / "r")
            assert not blocked_best.exists()
    finally:
        blocked_best.parent.chmod(0o700)
    # The checkpoint lands first (swapped in whole), then the reports that describe it: a failure
    # writing the reports leaves a complete new models/best and no temp folder, never a missing one.
    with pytest.raises(OSError):
        publish.publish(records, best, data, NullTracker(), select_by="val_loss", best_dir=good, reports_dir=blocked)
    assert sorted(p.name for p in good.iterdir()) == ["model.json", "model.safetensors", "summary.txt"]
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["best"]  # no temp folders left behind


# --------------------------------------------------------------------------- failures


@pytest.mark.slow
def test_diverged_run_is_failed_and_best_is_chosen_among_finished(data, store, tmp_path):
    params = make_params(lr=[1000.0, 0.01], batch_size=32, optimizer="sgd")
    tracker = open_tracker(mlflow_settings(store, "diverge"))
    with tracker.running():
        ctx = TrainContext(data=data, tracker=tracker, progress=False)
        records = run_search(expand_grid(params), ctx, report=None)
    diverged, finished = records
    assert diverged.result.status == "diverged" and not diverged.ok
    assert diverged.result.stop_reason.startswith("diverged: loss is nan at epoch 1")
    assert finished.ok
    assert select_best(records, "val_loss") is finished
    assert select_best(records, "val_top1") is finished
    client = client_for(store)
    failed = client.get_run(diverged.mlflow_run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["failure_reason"].startswith("diverged: loss is nan at epoch 1 batch")
    assert failed.data.tags["status"] == "diverged"
    assert client.get_run(finished.mlflow_run_id).info.status == "FINISHED"
    frame = train_files.grid_frame(records)
    assert list(frame["status"]) == ["diverged", "finished"]
    assert pd.isna(frame.loc[0, "val_loss"]) and frame.loc[1, "val_loss"] == pytest.approx(finished.result.best.val_loss)

    train_files.write_reports(tmp_path, records, finished, select_by="val_loss")

    def no_nan(token):
        raise AssertionError(f"{token} is not JSON")

    rows = json.loads((tmp_path / "grid.json").read_text(), parse_constant=no_nan)
    assert rows[0]["status"] == "diverged" and rows[0]["val_loss"] is None and rows[0]["best_epoch"] is None
    assert rows[0]["stop_reason"].startswith("diverged: loss is nan")
    summary = json.loads((tmp_path / "train.json").read_text(), parse_constant=no_nan)
    assert summary["runs_total"] == 2 and summary["runs_failed"] == 1 and summary["run_id"] == finished.cfg.run_id
    assert set(pd.read_csv(tmp_path / "history.csv")["run_id"]) == {finished.cfg.run_id}  # the diverged run had no full epoch


@pytest.mark.slow
def test_a_crashing_run_is_recorded_failed_and_the_grid_goes_on(data, store):
    params = make_params(lr=[0.05, 0.01], batch_size=32)

    def crash_on_first(cfg, data_, **kwargs):
        if cfg.values.lr == 0.05:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return engine_train_run(cfg, data_, **kwargs)

    tracker = open_tracker(mlflow_settings(store, "crash"))
    lines: list[str] = []
    with tracker.running():
        ctx = TrainContext(data=data, tracker=tracker, progress=False, train_run=crash_on_first)
        records = run_search(expand_grid(params), ctx, report=lines.append)
    crashed, ok = records
    assert crashed.result.status == "failed" and "RuntimeError: CUDA error" in crashed.result.stop_reason
    assert ok.ok and select_best(records, "val_loss") is ok
    assert "FAILED (failed: RuntimeError: CUDA error" in next(line for line in lines if line.startswith("run 1/2"))
    client = client_for(store)
    assert client.get_run(crashed.mlflow_run_id).info.status == "FAILED"
    assert client.get_run(ok.mlflow_run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_train_context_pickles_for_worker_processes(data, store):
    import pickle

    tracker = open_tracker(mlflow_settings(store, "pickle-ctx"))
    ctx = TrainContext(data=data, tracker=tracker, layer_stats=True)
    clone = pickle.loads(pickle.dumps(ctx))
    tracker.end_parent()
    assert clone.tracker.parent_run_id == tracker.parent_run_id and torch.equal(clone.data.val.images, data.val.images)


def test_executor_honours_an_explicit_worker_count():
    settings = make_params(grid={"workers": 4}).grid
    executor = make_executor(settings, 8, cores=8)
    assert executor.workers == 4 and executor.description == "4 worker processes x 2 torch thread(s)"
    assert isinstance(make_executor(make_params().grid, 8, cores=1), SequentialExecutor)


@pytest.mark.slow
def test_ctrl_c_marks_child_and_parent_killed_and_propagates(data, store):
    params = make_params(lr=[0.05, 0.01], batch_size=32)

    def interrupted_after_first_epoch(cfg, data_, *, on_epoch=None, **kwargs):
        def hook(record, model):
            on_epoch(record, model)
            raise KeyboardInterrupt

        return engine_train_run(cfg, data_, on_epoch=hook, **kwargs)

    tracker = open_tracker(mlflow_settings(store, "ctrl-c"))
    with pytest.raises(KeyboardInterrupt), tracker.running():
        ctx = TrainContext(data=data, tracker=tracker, progress=False, train_run=interrupted_after_first_epoch)
        run_search(expand_grid(params), ctx, report=None)
    client = client_for(store)
    children = children_of(client, tracker)
    assert list(children) == ["lr=0.05"]  # the grid stopped: no second child
    assert children["lr=0.05"].info.status == "KILLED"
    assert len(client.get_metric_history(children["lr=0.05"].info.run_id, "val_loss")) == 1
    assert client.get_run(tracker.parent_run_id).info.status == "KILLED"
