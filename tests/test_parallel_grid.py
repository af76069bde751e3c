"""Parallel grids on one machine: spawned worker processes, one MLflow writer, Ctrl-C.

The same 2x2 grid is trained as the stage plans it on two cores (``auto``:
two spawned workers x one torch thread) and once in this process with the
thread count ``make_executor`` plans for every backend; results and weights
must be bitwise equal (the README's claim), and MLflow must hold one parent and four
children with full per-epoch histories, all written by the parent process.
Worker start-up (spawn + import torch) costs a few seconds, so the tests
that start a pool are marked slow; the planning and plumbing tests are fast.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cnnpipe.compute.parallelism import plan_parallelism, spread
from cnnpipe.compute.ray_cluster import ClusterError, _host_port, connect_ray
from cnnpipe.search import backend_choice
from cnnpipe.search.backend_choice import make_executor
from cnnpipe.search.backend_pool import ProcessExecutor, WorkerDied
from cnnpipe.search.backend_sequential import SequentialExecutor
from cnnpipe.search.trial_data import InlineSource
from cnnpipe.search.trial import run_one
from cnnpipe.search.trial import TrainContext
from cnnpipe.search.trial import RunError
from cnnpipe.search.selection import select_best
from cnnpipe.search.runner import run_search
from cnnpipe.search.search_progress import epoch_line
from cnnpipe.search.log import SearchLog
from cnnpipe.search.search_progress import SearchProgress
from cnnpipe.engine.data import TrainData
from cnnpipe.engine.loop import train_run as engine_train_run
from cnnpipe.util.errors import CnnpipeError, DataError, ParamsError
from cnnpipe.params.sections import MlflowParams
from cnnpipe.search.space import expand as expand_grid
from cnnpipe.tracking.runs import open_tracker
from synthetic import TINY
from synthetic import tiny_params as make_params

ROOT = Path(__file__).resolve().parents[1]
EPOCH_METRICS = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr")
TIMING = ("epoch_seconds", "images_per_s")

pytestmark = pytest.mark.long(40)


def deterministic(record) -> dict:
    """An epoch's metrics without the wall-clock ones."""
    return {key: value for key, value in record.to_dict().items() if key not in TIMING}


@pytest.fixture(scope="module")
def prepared(tiny_prepared) -> Path:
    return tiny_prepared


@pytest.fixture(scope="module")
def data(prepared) -> TrainData:
    return TrainData.load(prepared, splits=("train", "val"))


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mlstore")


def settings(store: Path, experiment: str) -> MlflowParams:
    return MlflowParams(tracking_uri=f"sqlite:///{store / 'mlflow.db'}", experiment=experiment)


def client_for(store: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def train(configs, data, prepared, store, experiment, executor, **ctx_kwargs):
    tracker = open_tracker(settings(store, experiment))
    lines: list[str] = []
    with tracker.running():
        ctx = TrainContext(data=data, tracker=tracker, progress=False, layer_stats=True,
                                prepared_dir=prepared, **ctx_kwargs)  # threads: the executor's
        records = run_search(configs, ctx, executor=executor, report=lines.append)
    return tracker, records, lines


@pytest.fixture(scope="module")
def both(data, prepared, store):
    """The 2x2 grid as the stage runs it on 2 cores (auto), and one run at a time with the same threads per run."""
    configs = expand_grid(make_params())
    pool = make_executor(make_params().grid, len(configs), cores=2)
    assert isinstance(pool, ProcessExecutor) and (pool.workers, pool.threads) == (2, 1)
    sequential = train(configs, data, prepared, store, "sequential", SequentialExecutor(pool.threads))
    parallel = train(configs, data, prepared, store, "parallel", pool)
    return sequential, parallel


# --------------------------------------------------------------------------- planning (fast)


def test_auto_workers_is_one_per_core_at_most_one_per_run():
    assert plan_parallelism("auto", runs=4, cores=2) == (2, 1)
    assert plan_parallelism("auto", runs=4, cores=16) == (4, 4)
    assert plan_parallelism("auto", runs=1, cores=8) == (1, 8)
    assert plan_parallelism(3, runs=8, cores=2) == (3, 1)
    assert plan_parallelism(8, runs=2, cores=16) == (2, 8)


def test_make_executor_picks_the_backend():
    grid_params = make_params(grid={"workers": "auto"}).grid
    assert isinstance(make_executor(grid_params, 4, cores=1), SequentialExecutor)
    pool = make_executor(grid_params, 4, cores=2)
    assert isinstance(pool, ProcessExecutor) and (pool.workers, pool.threads) == (2, 1)
    # a GPU is the bottleneck: auto trains one run at a time there
    assert isinstance(make_executor(grid_params, 4, device="cuda", cores=16), SequentialExecutor)
    assert isinstance(make_executor(make_params(grid={"workers": 1}).grid, 4, cores=16),
                      SequentialExecutor)


def test_one_worker_runs_in_this_process_with_every_core_and_restores_the_thread_count():
    one = make_executor(make_params(grid={"workers": 1}).grid, 4, cores=2)
    assert isinstance(one, SequentialExecutor) and one.threads == 2
    before = torch.get_num_threads()
    seen = list(SequentialExecutor(threads=1).map(lambda x: (x, torch.get_num_threads()), [(1,), (2,)]))
    assert seen == [(1, 1), (2, 1)] and torch.get_num_threads() == before
    assert list(SequentialExecutor().map(lambda x: torch.get_num_threads(), [(1,)])) == [before]


def test_spread_threads_plans_the_idle_workers_cores_for_a_smaller_rung():
    assert [spread(2, 1, tasks) for tasks in (1, 2, 3)] == [2, 1, 1]
    assert [spread(4, 2, tasks) for tasks in (1, 2, 3, 4)] == [8, 4, 2, 2]
    plain = make_executor(make_params().grid, 4, cores=2)
    spreading = make_executor(make_params(grid={"spread_threads": True}).grid, 4, cores=2)
    assert (plain.threads_for(1), spreading.threads_for(1), spreading.threads_for(2)) == (1, 2, 1)


@pytest.mark.slow
def test_spread_threads_pins_a_lone_trials_worker_to_every_core():
    """Halving's last rung (1 trial, 2 workers): off, its process keeps 1 thread; on, it gets both cores."""
    def threads_seen(executor, tasks):
        return sorted(executor.map(torch.get_num_threads, [()] * tasks))

    assert threads_seen(ProcessExecutor(2, 1), 1) == [1]
    assert threads_seen(ProcessExecutor(2, 1, spread_threads=True), 1) == [2]
    assert threads_seen(ProcessExecutor(2, 1, spread_threads=True), 2) == [1, 1]


def test_ray_backend_without_ray_is_one_line(monkeypatch):
    monkeypatch.setattr(backend_choice, "ray_installed", lambda: False)  # the name make_executor calls
    with pytest.raises(CnnpipeError) as info:
        make_executor(make_params(grid={"backend": "ray"}).grid, 4)
    assert str(info.value) == "grid.backend is ray but ray is not installed; pip install 'cnnpipe[ray]'"


def test_a_ray_address_where_nothing_listens_is_one_line_at_once():
    """Not minutes of Ray retries and a process exit: a TCP check first (the stage prints this line, exit 1)."""
    import socket

    pytest.importorskip("ray")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again below: nothing listens there
    with pytest.raises(ClusterError) as info:
        connect_ray(f"127.0.0.1:{port}")
    assert str(info.value) == (f"cannot reach the Ray cluster at grid.ray_address 127.0.0.1:{port} (Connection refused); "
                               f"start it (ray start --head --port={port}) or fix grid.ray_address")
    assert _host_port("ray://head-node:10001") == ("head-node", 10001)
    assert _host_port("[::1]:6379") == ("::1", 6379) and _host_port("auto") is None


def test_a_run_error_crosses_processes_as_the_same_one_line_error():
    err = RunError(3, "ParamsError", "params.yaml: lr must be > 0", 2)
    clone = pickle.loads(pickle.dumps(err))
    rebuilt = clone.rebuild()
    assert clone.index == 3 and type(rebuilt) is ParamsError
    assert str(rebuilt) == "params.yaml: lr must be > 0" and rebuilt.exit_code == 2
    assert type(RunError(1, "NotAnError", "x").rebuild()) is CnnpipeError


def test_outcome_packs_the_model_as_safetensors_and_rebuilds_it(data):
    cfg = expand_grid(make_params(lr=0.01, batch_size=64, epochs=1))[0]
    outcome = run_one(TrainContext(data=data, progress=False), 1, cfg)
    packed = pickle.loads(pickle.dumps(outcome.packed()))
    from safetensors.torch import load

    assert packed.record.result.model is None and set(load(packed.weights)) == set(outcome.record.result.model.state_dict())
    rebuilt = packed.unpacked(data).result.model
    original = outcome.record.result.model.state_dict()
    assert all(torch.equal(original[key], value) for key, value in rebuilt.state_dict().items())
    assert not rebuilt.training


def test_epoch_line_names_the_run():
    cfg = expand_grid(make_params())[1]
    from cnnpipe.engine.records import EpochRecord

    record = EpochRecord(2, 0.41234, 0.8, 0.39211, 0.85714, 0.99, 0.01, 12.34, 1000.0)
    assert epoch_line(cfg, record) == (
        "[lr=0.05,batch_size=64] epoch 2/2: train_loss 0.4123 val_loss 0.3921 val_top1 0.8571 (12.3 s)")


# --------------------------------------------------------------------------- a real parallel grid


@pytest.mark.slow
def test_parallel_results_and_weights_equal_sequential_bitwise(both):
    (_, seq, _), (_, par, _) = both
    assert [rec.index for rec in par] == [1, 2, 3, 4]  # grid order, whatever the completion order
    for a, b in zip(seq, par):
        assert a.cfg.run_id == b.cfg.run_id and a.result.status == b.result.status == "finished"
        assert [deterministic(e) for e in a.result.history] == [deterministic(e) for e in b.result.history]
        assert a.result.best_epoch == b.result.best_epoch
        sa, sb = a.result.model.state_dict(), b.result.model.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[key], sb[key]) for key in sa)
    assert select_best(seq, "val_loss").index == select_best(par, "val_loss").index


@pytest.mark.slow
def test_parallel_grid_logs_one_parent_and_four_children_with_full_histories(both, store):
    _, (tracker, records, _) = both
    client = client_for(store)
    runs = client.search_runs([tracker.experiment_id])
    assert len(runs) == 5
    parent = client.get_run(tracker.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["cnnpipe.role"] == "parent"
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == tracker.parent_run_id]
    assert sorted(run.info.run_id for run in children) == sorted(rec.mlflow_run_id for rec in records)
    for rec in records:
        run = client.get_run(rec.mlflow_run_id)
        assert run.info.status == "FINISHED" and run.info.run_name == rec.cfg.name
        assert run.data.tags["cnnpipe.pid"] == str(os.getpid())  # written by the parent, not a worker
        for key in EPOCH_METRICS:
            history = sorted(client.get_metric_history(rec.mlflow_run_id, key), key=lambda m: m.step)
            assert [m.step for m in history] == [1, 2]
            assert [m.value for m in history] == pytest.approx([getattr(e, key) for e in rec.result.history])
        assert len(client.get_metric_history(rec.mlflow_run_id, "grad_norm/0")) == 2
        artifacts = {a.path for a in client.list_artifacts(rec.mlflow_run_id)}
        assert {"model_summary.txt", "history.csv", "layer_histograms.png"} <= artifacts


@pytest.mark.slow
def test_parallel_progress_shows_every_run_per_epoch(both):
    _, (_, records, lines) = both
    assert lines[:2] == ["search: 4 trial(s), exhaustive; cache off, 0 resumed", "grid: 2 worker processes x 1 torch thread(s)"]
    for rec in records:
        for epoch in (1, 2):
            assert any(line.startswith(f"[{rec.cfg.name}] epoch {epoch}/2: train_loss ") for line in lines)
        assert sum(line.startswith(f"run {rec.index}/4 {rec.cfg.name}: best val_loss") for line in lines) == 1


@pytest.mark.slow
def test_late_or_missing_epoch_events_still_give_full_histories(data, store):
    """The result can overtake its events: finish() fills the history, late events are ignored."""
    cfg = expand_grid(make_params(lr=0.01, batch_size=64))[0]
    tracker = open_tracker(settings(store, "late-events"))
    with tracker.running():
        ctx = TrainContext(data=data, tracker=tracker, progress=False)
        log = SearchLog(ctx, tracker, {1: cfg}, select_by="val_loss", progress=SearchProgress(None, bars=False))
        outcome = run_one(ctx.for_workers(InlineSource(data)), 1, cfg)  # no events at all
        rec = log.finish(outcome, final=True)
        log.handle(("epoch", 1, rec.result.history[0]))  # arrives after the result: ignored
    history = client_for(store).get_metric_history(rec.mlflow_run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2]


@pytest.mark.slow
def test_a_crash_in_a_worker_fails_that_run_and_the_grid_goes_on(data, prepared, store):
    configs = expand_grid(make_params(batch_size=64))
    tracker, records, lines = train(configs, data, prepared, store, "crash", ProcessExecutor(2, 1),
                                    train_run=crash_on_lr_005)
    crashed, ok = records
    assert crashed.result.status == "failed" and "RuntimeError: worker crash for lr=0.05" in crashed.result.stop_reason
    assert ok.ok and select_best(records, "val_loss") is ok
    client = client_for(store)
    assert client.get_run(crashed.mlflow_run_id).info.status == "FAILED"
    assert client.get_run(ok.mlflow_run_id).info.status == "FINISHED"


def crash_on_lr_005(cfg, data, **kwargs):
    """Module level, so spawned workers can unpickle it."""
    if cfg.values.lr == 0.05:
        raise RuntimeError(f"worker crash for lr={cfg.values.lr}")
    return engine_train_run(cfg, data, **kwargs)


@pytest.mark.slow
def test_a_user_error_in_a_worker_stops_the_grid_with_one_line(data, prepared, tmp_path):
    from synthetic import make_prepared

    other = tmp_path / "other"
    make_prepared(other, n_train=300, n_val=100, n_test=20, seed=7)  # same layout, different fingerprint
    ctx = TrainContext(data=data, progress=False, prepared_dir=other)
    with pytest.raises(DataError) as info:
        run_search(expand_grid(make_params(batch_size=64)), ctx, executor=ProcessExecutor(2, 1),
                        report=None)
    assert "changed while the grid was running" in str(info.value) and "\n" not in str(info.value)


def exit_abruptly(cfg, data, **kwargs):
    """A worker killed by the OS (e.g. the out-of-memory killer), as far as the parent can tell."""
    os._exit(9)


@pytest.mark.slow
def test_a_dead_worker_process_is_one_line_not_a_hang(data, prepared):
    ctx = TrainContext(data=data, progress=False, prepared_dir=prepared, train_run=exit_abruptly)
    with pytest.raises(WorkerDied) as info:
        run_search(expand_grid(make_params(batch_size=64)), ctx, executor=ProcessExecutor(2, 1),
                        report=None)
    assert str(info.value).startswith("a grid worker process died") and "grid.workers" in str(info.value)


CTRL_C_SCRIPT = r"""
import multiprocessing, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if the test runner ignores SIGINT
sys.path.insert(0, {tests!r})
from pathlib import Path
from cnnpipe.search.backend_pool import ProcessExecutor
from cnnpipe.engine.data import TrainData
from cnnpipe.params.load import parse_params
from cnnpipe.params.sections import MlflowParams
from cnnpipe.search.runner import run_search
from cnnpipe.search.space import expand as expand_grid
from cnnpipe.search.trial import TrainContext
from cnnpipe.tracking.runs import open_tracker

if __name__ == "__main__":
    prepared = Path({prepared!r})
    params = parse_params({{"model": "tiny", "models": {{"tiny": {tiny!r}}}, "lr": [0.05, 0.01, 0.003],
                           "batch_size": 16, "epochs": 400, "patience": 400, "data": {{"dataset": "fashion-mnist"}}}})
    tracker = open_tracker(MlflowParams(tracking_uri={uri!r}, experiment="ctrl-c"))
    print("PARENT", tracker.parent_run_id, flush=True)
    try:
        with tracker.running():
            ctx = TrainContext(data=TrainData.load(prepared, splits=("train", "val")), tracker=tracker,
                                    progress=False, prepared_dir=prepared)
            run_search(expand_grid(params), ctx, executor=ProcessExecutor(2, 1),
                            report=lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("INTERRUPTED workers left:", len(multiprocessing.active_children()), flush=True)
        sys.exit(130)
"""


@pytest.mark.slow
def test_ctrl_c_stops_workers_marks_started_runs_killed_and_skips_pending(prepared, store, tmp_path):
    script = tmp_path / "grid_ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT.format(tests=str(ROOT / "tests"), prepared=str(prepared), tiny=TINY,
                                           uri=f"sqlite:///{store / 'mlflow.db'}"))
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)  # its own process group, like a terminal's job
    seen: list[str] = []
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line.strip())
            if " epoch 2/400:" in line:  # a run is well under way
                os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the parent AND the workers
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    seen += out.splitlines()
    assert proc.returncode == 130, err[-2000:]
    assert "INTERRUPTED workers left: 0" in seen
    parent_id = next(line.split()[1] for line in seen if line.startswith("PARENT "))
    client = client_for(store)
    assert client.get_run(parent_id).info.status == "KILLED"
    experiment = client.get_experiment_by_name("ctrl-c").experiment_id
    children = client.search_runs([experiment], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert 1 <= len(children) <= 2  # two workers: the third run was pending and never started
    assert {child.info.status for child in children} == {"KILLED"}
    assert all(child.data.tags["failure_reason"].startswith("interrupted") for child in children)
