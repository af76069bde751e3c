"""``grid.backend: ray``: the grid's runs as Ray tasks on a local Ray, same results as the local backend.

Needs the optional extra (``pip install 'cnnpipe[ray]'``); skipped cleanly
without it. Starting a local Ray takes several seconds, so the whole module
is slow and starts Ray once.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from cnnpipe.search.backend_choice import make_executor  # noqa: E402
from cnnpipe.search.backend_ray import RayExecutor  # noqa: E402
from cnnpipe.search.backend_sequential import SequentialExecutor  # noqa: E402
from cnnpipe.search.trial import TrainContext  # noqa: E402
from cnnpipe.search.selection import select_best  # noqa: E402
from cnnpipe.search.runner import run_search  # noqa: E402
from cnnpipe.engine.data import TrainData
from cnnpipe.params.sections import MlflowParams
from cnnpipe.search.space import expand as expand_grid  # noqa: E402
from cnnpipe.tracking.runs import open_tracker  # noqa: E402
from synthetic import tiny_params  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.long(40)]

TIMING = ("epoch_seconds", "images_per_s")


def params():
    return tiny_params(batch_size=64, grid={"backend": "ray"})


def configs():
    return expand_grid(params())


@pytest.fixture(scope="module")
def prepared(tiny_prepared) -> Path:
    return tiny_prepared


@pytest.fixture(scope="module")
def both(prepared, tmp_path_factory):
    """The grid on the local backend (this process) and as tasks on a local Ray (one torch thread per run)."""
    data = TrainData.load(prepared, splits=("train", "val"))
    local_ctx = TrainContext(data=data, progress=False, num_threads=1)
    local = run_search(configs(), local_ctx, report=None)

    store = tmp_path_factory.mktemp("mlstore")
    tracker = open_tracker(MlflowParams(tracking_uri=f"sqlite:///{store / 'mlflow.db'}", experiment="ray"))
    executor = make_executor(params().grid, 2)
    assert isinstance(executor, RayExecutor)
    lines: list[str] = []
    with tracker.running():
        ctx = TrainContext(data=data, tracker=tracker, progress=False, num_threads=1, prepared_dir=prepared)
        remote = run_search(configs(), ctx, executor=executor, report=lines.append)
    assert not ray.is_initialized()  # the local Ray it started is shut down again
    return local, remote, tracker, store, lines


def test_ray_results_and_weights_equal_the_local_backend(both):
    local, remote, *_ = both
    assert [rec.index for rec in remote] == [1, 2]
    for a, b in zip(local, remote):
        assert b.result.status == "finished" and a.cfg.run_id == b.cfg.run_id
        strip = lambda e: {k: v for k, v in e.to_dict().items() if k not in TIMING}  # noqa: E731
        assert [strip(e) for e in a.result.history] == [strip(e) for e in b.result.history]
        sa, sb = a.result.model.state_dict(), b.result.model.state_dict()
        assert all(torch.equal(sa[key], sb[key]) for key in sa)
    assert select_best(local, "val_loss").index == select_best(remote, "val_loss").index


def test_ray_runs_are_tracked_by_the_driver_with_full_histories(both):
    from mlflow import MlflowClient

    _, remote, tracker, store, lines = both
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    children = client.search_runs([tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'")
    assert sorted(c.info.run_id for c in children) == sorted(rec.mlflow_run_id for rec in remote)
    for rec in remote:
        assert client.get_run(rec.mlflow_run_id).info.status == "FINISHED"
        assert [m.step for m in sorted(client.get_metric_history(rec.mlflow_run_id, "val_loss"), key=lambda m: m.step)] == [1, 2]
    assert client.get_run(tracker.parent_run_id).info.status == "FINISHED"
    assert any(line.startswith("grid: Ray tasks on a local Ray") for line in lines)
    assert any(line.startswith("[lr=0.05] epoch 2/2:") for line in lines)  # epochs stream back from the tasks


def test_successive_halving_on_ray_selects_and_trains_like_the_local_backend(prepared, tmp_path):
    """Rungs map onto Ray one after another (Ray stays up between them); promoted trials resume from state."""
    from cnnpipe.store.states import RunStateStore
    from cnnpipe.search.strategies import halving

    data = TrainData.load(prepared, splits=("train", "val"))
    trials = expand_grid(tiny_params(lr=[0.05, 0.02, 0.01, 0.005], batch_size=64, epochs=3, patience=9,
                                     grid={"backend": "ray"}))
    results = {}
    for name, executor in (("local", SequentialExecutor(1)), ("ray", make_executor(params().grid, 4))):
        ctx = TrainContext(data=data, progress=False, num_threads=1, prepared_dir=prepared, state_root=tmp_path / name)
        results[name] = run_search(trials, ctx, executor=executor, strategy=halving(eta=2, min_epochs=1),
                                   states=RunStateStore(tmp_path / name), report=None)
    assert not ray.is_initialized()
    local, remote = results["local"], results["ray"]
    assert [r.pruned for r in local] == [r.pruned for r in remote]
    assert [r.result.epochs_run for r in local] == [r.result.epochs_run for r in remote]
    a = select_best([r for r in local if not r.pruned], "val_loss")
    b = select_best([r for r in remote if not r.pruned], "val_loss")
    assert a.index == b.index
    sa, sb = a.result.model.state_dict(), b.result.model.state_dict()
    assert all(torch.equal(sa[key], sb[key]) for key in sa)
