"""Incremental grids: a run whose config, data and code are unchanged is reused, not retrained.

``tests/test_runcache.py`` covers the key function; here the whole loop:
``train_grid`` with a ``GridCache`` trains only cache misses (counted at the
``train_run`` seam), logs reused runs to MLflow as complete children tagged
``cnnpipe.reused``, marks them in grid.csv, and retrains whenever the seed,
the layer spec, the data or the code changes. The last test drives
``stages/train.py`` (``--no-cache``) as DVC does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from cnnpipe.reports import train_files

from cnnpipe.store import run_cache as runs
from cnnpipe.util.env import NO_CACHE
from cnnpipe.tracking.runs import NullTracker
from cnnpipe.search.trial import TrainContext
from cnnpipe.search.selection import select_best
from cnnpipe.search.runner import run_search
from cnnpipe.engine.data import TrainData
from cnnpipe.engine.loop import train_run as engine_train_run
from cnnpipe.params.sections import MlflowParams
from cnnpipe.search.space import expand as expand_grid
from cnnpipe.store.run_cache import GridCache, RunCache
from cnnpipe.tracking.runs import open_tracker
from synthetic import TINY, tiny_params

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("epoch_seconds", "images_per_s")


def make_params(**changes):
    return tiny_params(**{"batch_size": 64, **changes})


class CountingTrain:
    """The engine's ``train_run``, counting which configs really trained."""

    def __init__(self) -> None:
        self.trained: list[str] = []

    def __call__(self, cfg, data, **kwargs):
        self.trained.append(cfg.name)
        return engine_train_run(cfg, data, **kwargs)


@pytest.fixture(scope="module")
def data(tiny_prepared) -> TrainData:
    return TrainData.load(tiny_prepared, splits=("train", "val"))


def run(params, data, cache, tracker=None, lines=None):
    counter = CountingTrain()
    ctx = TrainContext(data=data, tracker=tracker or NullTracker(), progress=False, layer_stats=True,
                            train_run=counter)
    records = run_search(expand_grid(params), ctx, cache=cache,
                              report=lines.append if lines is not None else None)
    return records, counter.trained


# --------------------------------------------------------------------------- one added lr trains one run


@pytest.fixture(scope="module")
def incremental(data, tmp_path_factory):
    """A 2-run grid, then the same grid with one lr added, on one cache and one MLflow store."""
    base = tmp_path_factory.mktemp("incremental")
    cache = GridCache(RunCache(base / "cache"))
    settings = MlflowParams(tracking_uri=f"sqlite:///{base / 'mlflow.db'}", experiment="incremental")
    outcomes = []
    for lrs in ([0.05, 0.01], [0.05, 0.01, 0.003]):
        tracker = open_tracker(settings)
        lines: list[str] = []
        with tracker.running():
            records, trained = run(make_params(lr=lrs), data, cache, tracker, lines)
        outcomes.append((tracker, records, trained, lines))
    return base, outcomes


@pytest.mark.slow
def test_adding_one_lr_trains_only_the_new_run(incremental):
    _, ((_, first, trained1, _), (_, second, trained2, lines)) = incremental
    assert trained1 == ["lr=0.05", "lr=0.01"]
    assert trained2 == ["lr=0.003"]
    assert [rec.cached for rec in second] == [True, True, False]
    assert lines[0] == "search: 3 trial(s), exhaustive; 2 reused from the cache, 0 resumed"
    assert lines[1].startswith("run 1/3 lr=0.05: best val_loss") and "reused (trained in" in lines[1]
    last = next(line for line in lines if line.startswith("run 3/3"))
    assert "reused" not in last and last.startswith("run 3/3 lr=0.003: best val_loss")


@pytest.mark.slow
def test_a_reused_run_is_the_original_result_and_weights(incremental):
    _, ((_, first, _, _), (_, second, _, _)) = incremental
    for old, new in zip(first, second[:2]):
        assert new.cfg.run_id == old.cfg.run_id and new.ok
        assert [e.to_dict() for e in new.result.history] == [e.to_dict() for e in old.result.history]
        assert new.result.best_epoch == old.result.best_epoch and new.result.seconds == old.result.seconds
        a, b = old.result.model.state_dict(), new.result.model.state_dict()
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert select_best(second, "val_loss").ok


@pytest.mark.slow
def test_reused_runs_are_complete_mlflow_children_tagged_with_their_origin(incremental):
    from mlflow import MlflowClient

    base, ((_, first, _, _), (tracker, second, _, _)) = incremental
    client = MlflowClient(tracking_uri=f"sqlite:///{base / 'mlflow.db'}")
    children = client.search_runs([tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'")
    assert sorted(c.info.run_name for c in children) == ["lr=0.003", "lr=0.01", "lr=0.05"]
    for old, new in zip(first, second[:2]):
        run = client.get_run(new.mlflow_run_id)
        assert new.mlflow_run_id != old.mlflow_run_id and run.info.status == "FINISHED"
        assert run.data.tags["cnnpipe.reused"] == "true" and run.data.tags["cnnpipe.reused_from"] == old.mlflow_run_id
        assert new.reused_from == old.mlflow_run_id
        for key in ("train_loss", "val_loss", "val_top1", "lr", "grad_norm/0"):
            history = sorted(client.get_metric_history(new.mlflow_run_id, key), key=lambda m: m.step)
            original = sorted(client.get_metric_history(old.mlflow_run_id, key), key=lambda m: m.step)
            assert [(m.step, m.value) for m in history] == [(m.step, m.value) for m in original]
        assert run.data.metrics["best_val_loss"] == pytest.approx(old.result.best.val_loss)
        artifacts = {a.path for a in client.list_artifacts(new.mlflow_run_id)}
        assert {"model_summary.txt", "history.csv", "layer_histograms.png"} <= artifacts
    trained = client.get_run(second[2].mlflow_run_id)
    assert "cnnpipe.reused" not in trained.data.tags


@pytest.mark.slow
def test_grid_csv_marks_reused_runs(incremental, tmp_path):
    _, (_, (_, second, _, _)) = incremental
    best = select_best(second, "val_loss")
    train_files.write_reports(tmp_path, second, best, select_by="val_loss")
    frame = pd.read_csv(tmp_path / "grid.csv")
    assert list(frame["cached"]) == [True, True, False]
    assert [row["cached"] for row in json.loads((tmp_path / "grid.json").read_text())] == [True, True, False]


# --------------------------------------------------------------------------- what invalidates


@pytest.mark.slow
def test_anything_that_affects_training_invalidates(data, tmp_path, monkeypatch):
    from synthetic import make_prepared

    cache = GridCache(RunCache(tmp_path / "cache"))
    one = dict(lr=0.01, epochs=1)
    assert run(make_params(**one), data, cache)[1] == ["model=tiny"]
    assert run(make_params(**one), data, cache)[1] == []  # unchanged: reused
    assert run(make_params(**one, seed=7), data, cache)[1] == ["model=tiny"]
    wider = [{"conv": 6, "kernel": 3}, *TINY[1:]]
    assert run(make_params(**one, models={"tiny": wider}), data, cache)[1] == ["model=tiny"]
    make_prepared(tmp_path / "other", n_train=300, n_val=100, n_test=20, seed=3)
    other = TrainData.load(tmp_path / "other", splits=("train", "val"))
    assert other.fingerprint != data.fingerprint
    assert run(make_params(**one), other, cache)[1] == ["model=tiny"]
    monkeypatch.setattr(runs, "code_version", lambda: "edited-engine")  # as if engine/ or models/ changed
    assert run(make_params(**one), data, cache)[1] == ["model=tiny"]
    monkeypatch.undo()
    assert run(make_params(**one), data, cache)[1] == []  # the original entry is still there


@pytest.mark.slow
def test_diverged_runs_are_never_cached(data, tmp_path):
    cache = GridCache(RunCache(tmp_path / "cache"))
    params = make_params(lr=[1000.0, 0.01], batch_size=32, optimizer="sgd", epochs=1)
    first, trained = run(params, data, cache)
    assert first[0].result.status == "diverged" and trained == ["lr=1000.0", "lr=0.01"]
    assert run(params, data, cache)[1] == ["lr=1000.0"]


def test_cache_policy_off_store_only_or_reuse(tmp_path, monkeypatch):
    assert runs.open_grid_cache(make_params(grid={"cache": False}).grid, root=tmp_path) is None
    assert runs.open_grid_cache(make_params().grid, root=tmp_path).reuse is True
    assert runs.open_grid_cache(make_params().grid, no_cache=True, root=tmp_path).reuse is False
    monkeypatch.setenv(NO_CACHE, "1")
    assert runs.open_grid_cache(make_params().grid, root=tmp_path).reuse is False


@pytest.mark.slow
def test_no_cache_retrains_and_refreshes_the_entry(data, tmp_path, monkeypatch):
    cache = GridCache(RunCache(tmp_path / "cache"))
    params = make_params(lr=0.01, epochs=1)
    run(params, data, cache)
    monkeypatch.setenv(NO_CACHE, "1")
    store_only = runs.open_grid_cache(make_params().grid, root=tmp_path / "cache")
    lines: list[str] = []
    assert run(params, data, store_only, lines=lines)[1] == ["model=tiny"]
    assert lines[0] == "search: 1 trial(s), exhaustive; cache not reused, 0 resumed"
    assert len(list((tmp_path / "cache").iterdir())) == 1  # the same key, rewritten


# --------------------------------------------------------------------------- the stage


def stage_project(base: Path) -> tuple[Path, dict[str, str]]:
    from synthetic import make_prepared

    (base / "stages").mkdir(parents=True)
    shutil.copy(ROOT / "stages" / "train.py", base / "stages" / "train.py")
    make_prepared(base / "data" / "prepared", n_train=300, n_val=100, n_test=20)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update({"model": "tiny", "models": {"tiny": TINY}, "lr": [0.05, 0.01], "batch_size": 64, "epochs": 1,
                "mlflow": {"enabled": False}, "grid": {"workers": 1}})
    (base / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CNNPIPE_DEBUG", NO_CACHE)}
    env["DVC_ROOT"] = str(base)
    return base, env


@pytest.mark.slow
def test_stage_reuses_runs_and_no_cache_flag_retrains(tmp_path):
    work, env = stage_project(tmp_path)

    def stage(*args):
        proc = subprocess.run([sys.executable, "stages/train.py", *args], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    first = stage()
    assert "search: 2 trial(s), exhaustive; 0 reused from the cache, 0 resumed" in first
    assert (work / ".cnnpipe-cache" / "runs").is_dir()  # anchored at $DVC_ROOT
    second = stage()
    assert "search: 2 trial(s), exhaustive; 2 reused from the cache, 0 resumed" in second and second.count("reused (trained in") == 2
    assert list(pd.read_csv(work / "reports" / "grid.csv")["cached"]) == [True, True]
    third = stage("--no-cache")
    assert "search: 2 trial(s), exhaustive; cache not reused, 0 resumed" in third
    assert list(pd.read_csv(work / "reports" / "grid.csv")["cached"]) == [False, False]
