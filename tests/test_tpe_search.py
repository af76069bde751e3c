"""grid.strategy: tpe: Optuna's TPE through ask/tell in fixed batches, reproducible in parallel, replayed from the run cache.

Real engine, real Optuna, tiny synthetic data (a trial is a fraction of a
second). The space is an ``lr`` range x a ``batch_size`` list x an ``epochs``
list, so trials of one batch take different times; in the process pool one
trial is also held back, so trials finish out of the order they were asked
in. What must hold (``search.ask_tell``):

* 1 worker and 2 worker processes ask the same trials and train bitwise the
  same weights (same threads per trial), whatever order they finish in;
* the same params ask the same trials, another ``search_seed`` others;
* raising ``grid.samples`` continues the same study: the first trials come
  from the run cache (told to the sampler, not trained) and the next ones are
  those a fresh, larger search asks;
* a SIGKILLed train stage resumes to the same trials, selection and weights.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cnnpipe.engine.data import TrainData
from cnnpipe.engine.loop import train_run as engine_train_run
from cnnpipe.engine.records import RunResult
from cnnpipe.params.sections import MlflowParams
from cnnpipe.search.ask_tell import Told, run_tpe, told_for
from cnnpipe.search.backend_pool import ProcessExecutor
from cnnpipe.search.backend_sequential import SequentialExecutor
from cnnpipe.search.space import TrialSpace
from cnnpipe.search.selection import RunRecord, select_best
from cnnpipe.search.trial import TrainContext
from cnnpipe.store.run_cache import GridCache, RunCache
from cnnpipe.store.states import RunStateStore
from cnnpipe.tracking.runs import open_tracker
from cnnpipe.util.errors import ParamsError
from synthetic import tiny_params

pytestmark = pytest.mark.long(45)

SPACE = dict(lr={"log_uniform": [1e-3, 0.1]}, batch_size=[32, 64], epochs=[1, 2], patience=5)  # trials of 1 or 2 epochs


def tpe_params(**grid):
    return tiny_params(**SPACE, grid={"strategy": "tpe", "samples": 8, "batch": 4, **grid})


@pytest.fixture(scope="module")
def data(tiny_prepared) -> TrainData:
    return TrainData.load(tiny_prepared, splits=("train", "val"))


class Counting:
    """The engine's ``train_run``, noting every epoch it really trains (name, epoch)."""

    def __init__(self) -> None:
        self.epochs: list[tuple[str, int]] = []

    def __call__(self, cfg, data, *, on_epoch=None, **kwargs):
        def hook(record, model):
            self.epochs.append((cfg.name, record.epoch))
            if on_epoch is not None:
                on_epoch(record, model)

        return engine_train_run(cfg, data, on_epoch=hook, **kwargs)

    @property
    def trained(self) -> list[str]:
        return list(dict.fromkeys(name for name, _ in self.epochs))


HELD_BACK = "CNNPIPE_TEST_HELD_BACK"  # a run id; pool workers inherit the environment
WAIT_FOR = "CNNPIPE_TEST_WAIT_FOR"  # the run id the held-back trial waits for
ORDER = "CNNPIPE_TEST_ORDER"  # a file: run ids in the order their trials ended


def held_back(cfg, data, **kwargs):
    """Module level (pool workers unpickle it): trials finish out of order by construction, whatever the load.

    The trial named in ``$CNNPIPE_TEST_HELD_BACK`` does not return before the one in ``$CNNPIPE_TEST_WAIT_FOR``
    (asked after it, trained on the other worker) has trained; each trial appends its run id to
    ``$CNNPIPE_TEST_ORDER`` as it ends, so the test reads the order they really finished in.
    """
    result = engine_train_run(cfg, data, **kwargs)
    order = Path(os.environ[ORDER])
    if cfg.run_id == os.environ.get(HELD_BACK):
        deadline = time.monotonic() + 600  # a safety net only: the other worker ends its trial in seconds
        while os.environ[WAIT_FOR] not in (order.read_text() if order.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.05)
    with open(order, "a", encoding="utf-8") as out:
        out.write(cfg.run_id + "\n")
    return result


def search(params, data, tmp: Path, *, executor=None, train_run=None, tracker=None, lines=None, prepared=None):
    """``run_tpe`` with a run cache and run states under ``tmp`` (1 torch thread per trial)."""
    ctx = TrainContext(data=data, progress=False, num_threads=1, state_root=tmp / "state", train_run=train_run,
                       prepared_dir=prepared, **({"tracker": tracker} if tracker is not None else {}))
    return run_tpe(params, ctx, executor=executor or SequentialExecutor(1), cache=GridCache(RunCache(tmp / "runs")),
                   states=RunStateStore(tmp / "state"), report=lines.append if lines is not None else None)


def ids(records) -> list[str]:
    return [rec.cfg.run_id for rec in records]


def same_weights(a: RunRecord, b: RunRecord) -> bool:
    x, y = a.result.model.state_dict(), b.result.model.state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def history(rec: RunRecord) -> list[dict]:
    return [{k: v for k, v in e.to_dict().items() if k not in ("epoch_seconds", "images_per_s")}
            for e in rec.result.history]


# --------------------------------------------------------------------------- the space (no training)


def test_lists_and_ranges_are_one_optuna_space():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    params = tiny_params(lr={"log_uniform": [1e-4, 0.1]}, batch_size=[32, 64], weight_decay={"uniform": [0, 0.1]},
                         epochs={"int_uniform": [1, 3]}, optimizer={"choice": ["adam", "sgd"]}, seed=[1],
                         grid={"strategy": "tpe", "samples": 4})
    space = TrialSpace(params)
    dists = space.distributions()
    assert list(dists) == ["lr", "batch_size", "epochs", "optimizer", "weight_decay"]  # a 1-value list is fixed
    assert dists["lr"] == FloatDistribution(1e-4, 0.1, log=True)
    assert dists["weight_decay"] == FloatDistribution(0.0, 0.1)
    assert dists["epochs"] == IntDistribution(1, 3)
    assert dists["batch_size"] == CategoricalDistribution([32, 64])  # a list is a choice, not a crossed axis
    assert dists["optimizer"] == CategoricalDistribution(["adam", "sgd"])
    assert params.grid_size == 4 and space.longest == 3
    assert params.describe_grid() == ("tpe over lr~log_uniform[0.0001, 0.1], batch_size~choice[32, 64], "
                                      "epochs~int_uniform[1, 3], optimizer~choice[adam, sgd], "
                                      "weight_decay~uniform[0.0, 0.1]")


def test_a_suggestion_is_a_run_config_with_four_digit_floats():
    space = TrialSpace(tpe_params())
    cfg = space.config({"lr": 0.0123456789, "batch_size": 64, "epochs": 2})
    assert (cfg.values.lr, cfg.values.batch_size, cfg.values.epochs, cfg.values.seed) == (0.01235, 64, 2, 42)
    assert cfg.name == "lr=0.01235,batch_size=64,epochs=2" and cfg.values.monitor == "val_loss"


def test_a_range_end_the_sampler_may_suggest_must_be_valid_before_anything_trains():
    params = tiny_params(lr=0.01, momentum={"uniform": [0.5, 0.99999]}, grid={"strategy": "tpe"})
    with pytest.raises(ParamsError) as info:
        TrialSpace(params)
    message = str(info.value)
    assert message.startswith("params.yaml: momentum must be < 1, got 1.0 (suggested from momentum")
    assert "narrow the range" in message and "\n" not in message


def test_what_the_sampler_is_told():
    cfg = TrialSpace(tpe_params()).config({"lr": 0.01, "batch_size": 32, "epochs": 1})
    assert told_for(RunRecord(1, cfg, RunResult.failed(cfg.run_id, "boom")), "val_loss", 1) == Told("fail")


# --------------------------------------------------------------------------- searches (train)


@pytest.fixture(scope="module")
def sequential(data, tmp_path_factory):
    """8 trials in batches of 4, one at a time in this process, logged to MLflow."""
    tmp = tmp_path_factory.mktemp("tpe-sequential")
    tracker = open_tracker(MlflowParams(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}", experiment="tpe"),
                           params={"strategy": "tpe"})
    lines: list[str] = []
    with tracker.running():
        records = search(tpe_params(), data, tmp, tracker=tracker, lines=lines)
    return tmp, tracker, records, lines


@pytest.fixture(scope="module")
def parallel(sequential, data, tiny_prepared, tmp_path_factory):
    """The same search on 2 worker processes x 1 thread. Trial 5 (the first of batch 2, started with trial 6 on
    the other worker) is held back, so trials finish out of the order they were asked in."""
    tmp = tmp_path_factory.mktemp("tpe-parallel")
    lines: list[str] = []
    asked = [rec.cfg.run_id for rec in sequential[2]]
    os.environ.update({HELD_BACK: asked[4], WAIT_FOR: asked[5], ORDER: str(tmp / "order")})
    try:
        records = search(tpe_params(), data, tmp, executor=ProcessExecutor(2, 1), train_run=held_back, lines=lines,
                         prepared=tiny_prepared)
    finally:
        for name in (HELD_BACK, WAIT_FOR, ORDER):
            del os.environ[name]
    ended = [asked.index(run_id) + 1 for run_id in (tmp / "order").read_text().split()]
    return records, lines, ended


@pytest.mark.slow
def test_one_worker_and_two_ask_the_same_trials_and_train_the_same_bits(sequential, parallel):
    _, _, one, one_lines = sequential
    two, _, ended = parallel
    assert len(one) == 8 and [rec.index for rec in one] == list(range(1, 9))
    assert ids(one) == ids(two)
    for a, b in zip(one, two):
        assert history(a) == history(b) and same_weights(a, b)
    assert select_best(one, "val_loss").index == select_best(two, "val_loss").index
    # the pool trained them in another order than they were asked: trial 6 ended before trial 5
    assert sorted(ended) == list(range(1, 9)) and ended.index(6) < ended.index(5)
    assert [int(m.group(1)) for line in one_lines if (m := re.match(r"run (\d+)/8 ", line))] == list(range(1, 9))
    assert one_lines[0] == "search: 8 trial(s), tpe in 2 batch(es) of 4; search_seed 0, val_loss minimized"
    assert "batch 2/2: trials 5-8; 0 reused from the cache, 0 resumed" in one_lines


@pytest.mark.slow
def test_every_trial_is_an_mlflow_child_of_the_search(sequential):
    from mlflow import MlflowClient

    tmp, tracker, records, _ = sequential
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    children = client.search_runs([tracker.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'")
    assert sorted(run.info.run_name for run in children) == sorted(rec.cfg.name for rec in records)
    assert all(run.info.status == "FINISHED" for run in children)


@pytest.mark.slow
def test_a_seed_asks_its_trials_again_and_a_raised_budget_continues_its_study(sequential, data, tmp_path):
    _, _, eight, _ = sequential
    # the same params ask the same trials (samples=4 is the first batch of the samples=8 search) ...
    counting = Counting()
    four = search(tpe_params(samples=4), data, tmp_path, train_run=counting)
    assert ids(four) == ids(eight)[:4] and counting.trained == [rec.cfg.name for rec in four]
    # ... another search_seed asks others
    other = search(tpe_params(samples=4, search_seed=1), data, tmp_path / "other")
    assert not set(ids(other)) & set(ids(eight)[:4])
    # raising the budget: the 4 trials come from the run cache, told to the sampler, which then asks what a
    # fresh samples=8 search asked after seeing them (TPE models batch 2 on batch 1's results)
    counting = Counting()
    lines: list[str] = []
    raised = search(tpe_params(), data, tmp_path, train_run=counting, lines=lines)
    assert ids(raised) == ids(eight)
    assert [rec.cached for rec in raised] == [True] * 4 + [False] * 4
    assert counting.trained == [rec.cfg.name for rec in eight[4:]]
    assert "batch 1/2: trials 1-4; 4 reused from the cache, 0 resumed" in lines
    for a, b in zip(raised, eight):
        assert history(a) == history(b) and same_weights(a, b)


@pytest.mark.slow
def test_halving_in_each_batch_prunes_and_a_rerun_trains_nothing(data, tmp_path):
    params = tpe_params(prune="halving", eta=2, min_epochs=1)
    lines: list[str] = []
    first = search(params, data, tmp_path, lines=lines)
    assert [rec.index for rec in first] == list(range(1, 9))
    assert sum(rec.pruned for rec in first) == 4  # eta 2: half of each batch of 4 is pruned after epoch 1
    assert sum(line.startswith("rung 1 done: promoted ") for line in lines) == 2
    counting = Counting()
    again = search(params, data, tmp_path, train_run=counting)
    assert counting.epochs == []  # survivors from the run cache, pruned trials from their run states
    assert ids(again) == ids(first) and [rec.pruned for rec in again] == [rec.pruned for rec in first]
    best = [select_best([rec for rec in records if not rec.pruned], "val_loss") for records in (first, again)]
    assert best[0].index == best[1].index and same_weights(*best)


# --------------------------------------------------------------------------- the train stage, killed and resumed


def stage_run_lines(proc: subprocess.Popen, stop: Callable[[list[str]], bool]) -> list[str]:
    """The stage's output lines until ``stop`` says so (then SIGKILL, as the OOM killer or a reboot would)."""
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if stop(lines):
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    return lines


@pytest.mark.slow
def test_a_killed_tpe_train_stage_resumes_to_the_same_trials_selection_and_weights(tmp_path):
    import pandas as pd
    from safetensors.torch import load_file

    from project_builder import run_stage, stage_project

    changes = dict(lr={"log_uniform": [1e-3, 0.1]}, batch_size=[32, 64], epochs=2, patience=5,
                   grid={"strategy": "tpe", "samples": 8, "batch": 4, "workers": 1}, mlflow={"enabled": False})
    work, root = stage_project(tmp_path / "killed", **changes)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CNNPIPE_DEBUG", "DVC_EXP_NAME")}
    env.update({"DVC_ROOT": str(root), "DVC_STAGE": "train", "MLFLOW_DISABLE_TELEMETRY": "true"})
    proc = subprocess.Popen([sys.executable, "stages/train.py"], cwd=work, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def sixth_trial_mid_way(lines: list[str]) -> bool:  # trial 5 finished, the next one has saved epoch 1
        done = next((i for i, line in enumerate(lines) if line.startswith("run 5/8 ")), None)
        return done is not None and any(" epoch 1/2: " in line for line in lines[done:])

    killed = stage_run_lines(proc, sixth_trial_mid_way)
    assert proc.returncode == -signal.SIGKILL, "\n".join(killed[-20:])
    assert not (work / "models" / "best").exists()
    resumed = run_stage(work, root)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out = resumed.stdout
    assert "batch 1/2: trials 1-4; 4 reused from the cache, 0 resumed" in out
    counts = re.search(r"batch 2/2: trials 5-8; (\d) reused from the cache, (\d) resumed", out)
    assert counts and int(counts[1]) >= 1 and int(counts[1]) + int(counts[2]) == 2, out

    straight_work, straight_root = stage_project(tmp_path / "straight", **changes)
    straight = run_stage(straight_work, straight_root)
    assert straight.returncode == 0, straight.stderr[-3000:]
    grids = [pd.read_csv(w / "reports" / "grid.csv") for w in (work, straight_work)]
    assert list(grids[0]["run_id"]) == list(grids[1]["run_id"]) and len(grids[0]) == 8
    for column in ("best_val_loss", "best_val_top1", "best_epoch", "epochs_run"):
        if column in grids[0]:
            assert list(grids[0][column]) == list(grids[1][column]), column
    chosen = [json.loads((w / "reports" / "train.json").read_text()) for w in (work, straight_work)]
    assert chosen[0]["run_id"] == chosen[1]["run_id"] and chosen[0]["val_loss"] == chosen[1]["val_loss"]
    weights = [load_file(w / "models" / "best" / "model.safetensors") for w in (work, straight_work)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert math.isfinite(chosen[0]["val_loss"])
