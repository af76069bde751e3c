"""The search package: run state and resume, successive halving, progress and crash reports.

Real engine, real MLflow sqlite store, tiny synthetic data (a run is well
under a second on an idle CPU). Pure bookkeeping tests run in milliseconds;
tests that train are marked slow.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cnnpipe.engine.data import TrainData
from cnnpipe.engine.records import EpochRecord, RunResult
from cnnpipe.engine.loop import train_run as engine_train_run
from cnnpipe.engine.resume import load_resume_state, save_resume_state, state_path
from cnnpipe.util.errors import CheckpointError
from cnnpipe.util.files import atomic_dir, exchange_paths
from cnnpipe.params.sections import MlflowParams
from cnnpipe.search.space import expand as expand_grid
from cnnpipe.search.runner import run_search
from cnnpipe.store.states import RunStateStore
from cnnpipe.search.selection import RunRecord, best_epoch_until, rung_score, select_best
from cnnpipe.search.strategies import Exhaustive, halving, promote
from cnnpipe.search.trial import TrainContext, run_one
from cnnpipe.tracking.runs import open_tracker
from synthetic import tiny_params

QUIET = {"progress": False}

pytestmark = pytest.mark.long(40)


@pytest.fixture(scope="module")
def data(tiny_prepared) -> TrainData:
    return TrainData.load(tiny_prepared, splits=("train", "val"))


def weights(rec: RunRecord) -> dict[str, torch.Tensor]:
    return rec.result.model.state_dict()


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metrics_of(history: list[EpochRecord]) -> list[tuple[float, ...]]:
    return [(r.epoch, r.train_loss, r.train_top1, r.val_loss, r.val_top1, r.val_top5, r.lr) for r in history]


# --------------------------------------------------------------------------- run state format (no training)


def test_run_state_round_trips_nested_tensors_int_keys_tuples_and_nan(tmp_path: Path) -> None:
    state = {"identity": "abc", "data_fingerprint": "fp", "epoch": 3,
             "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.ones(2, 3)}},
                           "param_groups": [{"betas": (0.9, 0.999), "params": [0], "lr": 0.1}]},
             "best_value": math.inf, "nan": math.nan, "generator": torch.ByteTensor([1, 2, 3]), "note": None}
    save_resume_state(tmp_path, state)
    back = load_resume_state(tmp_path, "abc", "fp")
    assert back["optimizer"]["state"][0]["step"].item() == 5.0 and torch.equal(back["optimizer"]["state"][0]["exp_avg"], torch.ones(2, 3))
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999) and 0 in back["optimizer"]["state"]
    assert back["best_value"] == math.inf and math.isnan(back["nan"]) and back["note"] is None
    assert torch.equal(back["generator"], torch.ByteTensor([1, 2, 3]))
    assert load_resume_state(tmp_path, "other", "fp") is None and load_resume_state(tmp_path, "abc", "fp2") is None


@pytest.mark.parametrize("damage", ["truncated", "pickle", "foreign"])
def test_a_damaged_or_foreign_state_is_refused_in_one_line(tmp_path: Path, damage: str) -> None:
    save_resume_state(tmp_path, {"identity": "abc", "data_fingerprint": "fp", "epoch": 1, "w": torch.ones(1000)})
    path = state_path(tmp_path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "pickle":
        import pickle

        path.write_bytes(pickle.dumps({"epoch": 1}))
    else:
        from safetensors.torch import save_file

        save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError) as info:
        load_resume_state(tmp_path)
    assert "\n" not in str(info.value) and str(path) in str(info.value) and "starts afresh" in str(info.value)


def test_a_bad_state_file_costs_a_fresh_start_not_the_grid(data: TrainData, tmp_path: Path) -> None:
    cfg = expand_grid(tiny_params(lr=0.01, batch_size=64, epochs=1))[0]
    folder = RunStateStore(tmp_path).folder(cfg, data.fingerprint, "cpu")
    folder.mkdir(parents=True)
    state_path(folder).write_bytes(b"not a state at all")
    events: list[tuple] = []
    outcome = run_one(TrainContext(data=data, progress=False, state_root=tmp_path), 1, cfg, emit=events.append)
    assert outcome.record.result.status == "finished" and outcome.record.result.epochs_run == 1
    assert len(outcome.notes) == 1 and "unreadable run state" in outcome.notes[0]
    assert events[0][0] == "note" and events[1] == ("start", 1, 0)


# --------------------------------------------------------------------------- strategies (no training)


def test_halving_rungs_keep_counts_and_planned_epochs() -> None:
    sha = halving(eta=3, min_epochs=1)
    assert sha.rungs(9) == [1, 3, 9] and sha.rungs(10) == [1, 3, 9, 10] and sha.rungs(1) == [1]
    assert [sha.keep(n) for n in (27, 9, 3, 2)] == [9, 3, 1, 1]
    # 27 points, rungs at epochs/9, epochs/3, epochs: 7 full runs' worth of epochs instead of 27
    assert sha.planned_epochs([9] * 27) == 7 * 9
    assert Exhaustive().planned_epochs([9] * 27) == 27 * 9 and Exhaustive().rungs(9) == [9]
    assert halving(eta=2, min_epochs=2).rungs(8) == [2, 4, 8]


def epoch(n: int, val_loss: float, val_top1: float) -> EpochRecord:
    return EpochRecord(n, 1.0, 0.5, val_loss, val_top1, 0.9, 0.01, 1.0, 100.0)


def trial(index: int, history: list[EpochRecord], status: str = "paused") -> RunRecord:
    cfg = expand_grid(tiny_params(lr=[0.1, 0.01, 0.001, 0.0001], batch_size=32))[index - 1]
    best = history[0] if history else None
    return RunRecord(index, cfg, RunResult(cfg.run_id, status, "", 1, best, history, len(history), 1.0, 1.0, None, "cpu"))


def test_promotion_ranks_by_history_up_to_the_rung_with_ties_to_grid_order() -> None:
    a = trial(1, [epoch(1, 0.9, 0.5), epoch(2, 0.5, 0.7), epoch(3, 0.1, 0.9)])
    b = trial(2, [epoch(1, 0.6, 0.6)])
    c = trial(3, [epoch(1, 0.6, 0.6)])
    failed = trial(4, [], status="failed")
    # at a rung ending at epoch 1, a's epochs 2-3 do not count: b and c tie, grid order breaks it
    kept, pruned = promote([failed, c, b, a], 2, 1, "val_loss")
    assert [r.index for r in kept] == [2, 3] and [r.index for r in pruned] == [1, 4]
    kept, _ = promote([failed, c, b, a], 1, 3, "val_loss")
    assert [r.index for r in kept] == [1]
    assert rung_score(failed, 3, "val_top1")[0] == math.inf
    assert best_epoch_until([epoch(1, 0.5, 0.1), epoch(2, 0.49, 0.2)], 2, "val_loss", 0.05).epoch == 1


# --------------------------------------------------------------------------- filesystem


def test_atomic_dir_exchanges_old_and_new_in_one_step(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "f").write_text("a")
    (b / "f").write_text("b")
    assert exchange_paths(a, b)  # Linux: renameat2(RENAME_EXCHANGE)
    assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"
    with atomic_dir(a) as staging:
        (staging / "f").write_text("new")
        assert (a / "f").read_text() == "b"  # untouched until the body succeeded
    assert (a / "f").read_text() == "new" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_cache_command_lists_and_prunes_by_age_and_count(tmp_path: Path, monkeypatch, capsys) -> None:
    import os
    import time

    from cnnpipe.store import inventory
    from cnnpipe.cli.main import main

    monkeypatch.setenv("CNNPIPE_CACHE_DIR", str(tmp_path / "runs"))
    for kind, names in (("runs", ["r1", "r2", "r3"]), ("state", ["s1", "s2"])):
        for age, name in enumerate(names):
            folder = tmp_path / kind / name
            folder.mkdir(parents=True)
            (folder / ("result.json" if kind == "runs" else "state.safetensors")).write_text("{}" if kind == "runs" else "x" * 100)
            stamp = time.time() - age * 86400
            for path in (folder, *folder.iterdir()):
                os.utime(path, (stamp, stamp))
    from cnnpipe.store.outputs import OutputCache

    source = tmp_path / "figure.png"
    source.write_bytes(b"png")
    figures = OutputCache("figures")  # beside runs/ (CNNPIPE_CACHE_DIR moves it too)
    for age, key in enumerate(["f1", "f2"]):
        stamp = time.time() - age * 86400
        for path in (figures.put(key, {"figure.png": source}), figures.root / key / "figure.png"):
            os.utime(path, (stamp, stamp))
    figures.get("f2", ["figure.png"])  # a reuse makes it the newest
    items = inventory.entries()
    assert sorted(e.path.name for e in items) == ["f1", "f2", "r1", "r2", "r3", "s1", "s2"]
    assert {e.path.name for e in inventory.select_prunable(items, older_than=1.5 * 86400, keep_last=None)} == {"r3"}
    assert {e.path.name for e in inventory.select_prunable(items, older_than=None, keep_last=1)} == {"r2", "r3", "s2", "f1"}
    with pytest.raises(SystemExit):
        main(["cache", "--keep-last", "1"])
    out = capsys.readouterr().out
    assert "finished runs (run cache): 3" in out and "resumable run states: 2" in out and "stored figures: 2" in out
    assert "pruned 4 entries" in out
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r1"]
    assert sorted(p.name for p in figures.root.iterdir()) == ["f2"]


# --------------------------------------------------------------------------- training


@pytest.mark.slow
def test_a_paused_run_continues_bitwise_like_an_uninterrupted_one(data: TrainData, tmp_path: Path) -> None:
    cfg = expand_grid(tiny_params(lr=0.01, batch_size=64, epochs=3, schedule="onecycle", augment="crop_flip",
                                  models={"tiny": [{"conv": 4, "kernel": 3}, "batchnorm", "relu", {"maxpool": 2},
                                                   {"conv": 8, "kernel": 3}, "relu",  # a channels_last weight
                                                   "flatten", {"dropout": 0.3}, "linear"]}))[0]
    straight = engine_train_run(cfg, data, **QUIET)
    paused = engine_train_run(cfg, data, resume_dir=tmp_path, stop_after=1, **QUIET)
    assert paused.status == "paused" and paused.epochs_run == 1 and paused.model is not None
    seen: list[int] = []
    resumed = engine_train_run(cfg, data, resume_dir=tmp_path, on_epoch=lambda r, m: seen.append(r.epoch), **QUIET)
    assert seen == [2, 3] and resumed.status == "finished"
    assert metrics_of(resumed.history) == metrics_of(straight.history)
    assert same_weights(resumed.model.state_dict(), straight.model.state_dict())


@pytest.mark.slow
def test_without_a_schedule_more_epochs_continue_the_saved_state(data: TrainData, tmp_path: Path) -> None:
    short = expand_grid(tiny_params(lr=0.01, batch_size=64, epochs=2, patience=9))[0]
    longer = expand_grid(tiny_params(lr=0.01, batch_size=64, epochs=3, patience=9))[0]
    engine_train_run(short, data, resume_dir=tmp_path, **QUIET)
    seen: list[int] = []
    continued = engine_train_run(longer, data, resume_dir=tmp_path, on_epoch=lambda r, m: seen.append(r.epoch), **QUIET)
    straight = engine_train_run(longer, data, **QUIET)
    assert seen == [3]
    assert metrics_of(continued.history) == metrics_of(straight.history)
    assert same_weights(continued.model.state_dict(), straight.model.state_dict())


def search(data, configs, tmp: Path, *, strategy=None, tracker=None, train_run=None, lines=None, cache=False):
    from cnnpipe.store.run_cache import GridCache, RunCache

    ctx = TrainContext(data=data, progress=False, num_threads=1, state_root=tmp / "state", train_run=train_run,
                       **({"tracker": tracker} if tracker is not None else {}))
    return run_search(configs, ctx, strategy=strategy, states=RunStateStore(tmp / "state"),
                      cache=GridCache(RunCache(tmp / "runs")) if cache else None,
                      report=(lines.append if lines is not None else None))


def test_a_state_folder_has_one_owner_at_a_time(tmp_path: Path) -> None:
    folder = tmp_path / "state" / "0123abcd"
    first, second = RunStateStore(tmp_path / "state"), RunStateStore(tmp_path / "state")
    assert first.claim(folder) and first.claim(folder)  # idempotent for its owner
    assert not second.claim(folder)  # another search (another open file: also in this process)
    assert second.claim(tmp_path / "state" / "other")
    first.release()
    assert second.claim(folder)
    second.release()
    assert first.entries() == []  # the lock files are not state entries


@pytest.mark.slow
def test_a_trial_another_search_holds_trains_without_touching_its_state(data, tmp_path) -> None:
    """Two trains of the same params at once (queued experiments, -j 2) must not share one state folder."""
    configs = expand_grid(tiny_params(lr=[0.05, 0.01], batch_size=64, epochs=2))
    store = RunStateStore(tmp_path / "state")
    held = store.folder(configs[1], data.fingerprint, "cpu")
    held.mkdir(parents=True)
    (held / "marker").write_text("the other search's")
    other = RunStateStore(tmp_path / "state")
    assert other.claim(held)
    lines: list[str] = []
    records = search(data, configs, tmp_path, lines=lines)
    assert [rec.result.status for rec in records] == ["finished", "finished"]
    assert (held / "marker").read_text() == "the other search's"  # neither resumed, written nor discarded
    assert not store.folder(configs[0], data.fingerprint, "cpu").exists()  # its own finished trial: dropped
    assert any("lr=0.01" in line and "another train is running this trial" in line for line in lines)
    alone = search(data, configs[1:], tmp_path / "alone")
    assert same_weights(weights(records[1]), weights(alone[0]))
    other.release()


@pytest.mark.slow
def test_halving_survivor_is_bitwise_the_exhaustive_run_and_every_trial_is_tracked(data, tmp_path) -> None:
    params = tiny_params(lr=[0.05, 0.02, 0.01, 0.005], batch_size=64, epochs=4, patience=9)
    configs = expand_grid(params)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = open_tracker(MlflowParams(tracking_uri=store, experiment="halving"))
    lines: list[str] = []
    with tracker.running():
        trials = search(data, configs, tmp_path / "a", strategy=halving(eta=2, min_epochs=1),
                        tracker=tracker, lines=lines)
    # 4 trials -> 2 at epoch 1 -> 1 at epoch 2 -> trained to epoch 4
    assert [rec.pruned for rec in trials].count(False) == 1
    assert sorted(rec.result.epochs_run for rec in trials) == [1, 1, 2, 4]
    assert any(line.startswith("rung 1/3: 4 trial(s) to epoch 1") for line in lines)
    assert any(line.startswith("rung 1 done: promoted ") for line in lines)
    best = select_best([rec for rec in trials if not rec.pruned], "val_loss")
    exhaustive = search(data, [best.cfg], tmp_path / "b")
    assert metrics_of(best.result.history) == metrics_of(exhaustive[0].result.history)
    assert same_weights(weights(best), weights(exhaustive[0]))
    # the same params select the same run, from a fresh state store
    again = search(data, configs, tmp_path / "c", strategy=halving(eta=2, min_epochs=1))
    assert select_best([rec for rec in again if not rec.pruned], "val_loss").index == best.index
    # MLflow: one child per trial under the parent, pruned ones FINISHED and tagged, curves stop there
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    children = client.search_runs([tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'")
    assert len(children) == 4 and all(run.info.status == "FINISHED" for run in children)
    pruned = client.search_runs([tracker.experiment_id], filter_string="tags.`cnnpipe.pruned` = 'true'")
    assert len(pruned) == 3
    assert sorted(run.data.tags["cnnpipe.rung"] for run in pruned) == ["1", "1", "2"]
    promoted = client.search_runs([tracker.experiment_id], filter_string="tags.`cnnpipe.pruned` = 'false'")
    assert [(run.info.run_name, run.data.tags["cnnpipe.rung"]) for run in promoted] == [(best.cfg.name, "3")]
    for run in pruned:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert steps == list(range(1, int(run.data.tags["cnnpipe.pruned_at_epoch"]) + 1))


@pytest.mark.slow
def test_an_interrupted_search_resumes_at_its_last_epoch_in_the_same_child_run(data, tmp_path) -> None:
    configs = expand_grid(tiny_params(lr=[0.05, 0.01], batch_size=64, epochs=3, patience=9))
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"

    def killed_in_epoch_3_of_run_2(cfg, data_, *, on_epoch=None, **kwargs):
        def hook(record, model):
            on_epoch(record, model)
            if cfg.values.lr == 0.01 and record.epoch == 2:
                raise KeyboardInterrupt  # the state of epoch 2 is saved before the hook runs

        return engine_train_run(cfg, data_, on_epoch=hook, **kwargs)

    first = open_tracker(MlflowParams(tracking_uri=store, experiment="resume"))
    with pytest.raises(KeyboardInterrupt), first.running():
        search(data, configs, tmp_path, tracker=first, train_run=killed_in_epoch_3_of_run_2, cache=True)
    trained: list[tuple[str, int]] = []

    def counting(cfg, data_, *, on_epoch=None, **kwargs):
        def hook(record, model):
            trained.append((cfg.name, record.epoch))
            on_epoch(record, model)

        return engine_train_run(cfg, data_, on_epoch=hook, **kwargs)

    second = open_tracker(MlflowParams(tracking_uri=store, experiment="resume"))
    lines: list[str] = []
    with second.running():
        resumed = search(data, configs, tmp_path, tracker=second, train_run=counting, lines=lines, cache=True)
    assert "search: 2 trial(s), exhaustive; 1 reused from the cache, 1 resumed" in lines
    assert "resumed lr=0.01 at epoch 2/3" in lines
    assert trained == [("lr=0.01", 3)]  # run 1 finished (run cache), run 2 lost only epoch 3
    assert RunStateStore(tmp_path / "state").entries() == []  # finished: states trimmed, the run cache has them
    straight = search(data, configs, tmp_path / "straight")
    assert RunStateStore(tmp_path / "straight" / "state").entries() == []
    for a, b in zip(resumed, straight):
        assert metrics_of(a.result.history) == metrics_of(b.result.history) and same_weights(weights(a), weights(b))
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    child = client.get_run(resumed[1].mlflow_run_id)
    assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == second.parent_run_id
    assert child.data.tags["cnnpipe.resumed_at_epoch"] == "2"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")] == [1, 2, 3]


@pytest.mark.slow
def test_a_crashed_run_keeps_its_traceback_in_mlflow_and_under_debug(data, tmp_path, monkeypatch) -> None:
    configs = expand_grid(tiny_params(lr=[0.05, 0.01], batch_size=64, epochs=1))

    def crash_second(cfg, data_, **kwargs):
        if cfg.values.lr == 0.01:
            raise RuntimeError("boom in the loss")
        return engine_train_run(cfg, data_, **kwargs)

    monkeypatch.setenv("CNNPIPE_DEBUG", "1")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = open_tracker(MlflowParams(tracking_uri=store, experiment="crash"))
    lines: list[str] = []
    with tracker.running():
        records = search(data, configs, tmp_path, tracker=tracker, train_run=crash_second, lines=lines)
    crashed = records[1]
    assert crashed.result.status == "failed" and crashed.result.stop_reason == "RuntimeError: boom in the loss"
    assert any(line.startswith("run 2/2 lr=0.01: FAILED (failed: RuntimeError: boom in the loss)") for line in lines)
    assert any("crashed:\nTraceback (most recent call last)" in line for line in lines)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    text = Path(client.download_artifacts(crashed.mlflow_run_id, "traceback.txt", str(tmp_path))).read_text()
    assert text.startswith("Traceback (most recent call last)") and "RuntimeError: boom in the loss" in text
    assert client.get_run(crashed.mlflow_run_id).info.status == "FAILED"


def test_the_rungs_figure_draws_every_trial(tmp_path: Path) -> None:
    import pandas as pd

    from cnnpipe.figures.search_figures import halving_rungs

    rows, grid = [], []
    for i, stop in enumerate([1, 1, 3, 9]):
        grid.append({"run_id": f"r{i}", "run_name": f"lr={i}", "epochs_run": stop, "pruned": stop < 9})
        rows += [{"run_id": f"r{i}", "epoch": e, "val_loss": 1.0 / (e + i), "val_top1": 0.5 + 0.01 * e}
                 for e in range(1, stop + 1)]
    path = halving_rungs(pd.DataFrame(rows), pd.DataFrame(grid), tmp_path / "rungs.png", selected_run_id="r3")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


@pytest.mark.slow
def test_the_train_stage_runs_successive_halving_from_params(tmp_path: Path) -> None:
    import pandas as pd

    from project_builder import run_stage, stage_project

    work, root = stage_project(tmp_path, lr=[0.05, 0.02, 0.01, 0.005], epochs=3, patience=9,
                               grid={"strategy": "halving", "eta": 2, "min_epochs": 1, "workers": 1},
                               mlflow={"enabled": False})
    proc = run_stage(work, root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "search: 4 trial(s), halving; 0 reused from the cache, 0 resumed" in proc.stdout
    assert "rung 1/3: 4 trial(s) to epoch 1" in proc.stdout and "rung 3/3: 1 trial(s) to the end" in proc.stdout
    grid = pd.read_csv(work / "reports" / "grid.csv")
    assert sorted(grid["epochs_run"]) == [1, 1, 2, 3] and list(grid["pruned"]).count(False) == 1
    assert sorted(grid["rung"]) == [1, 1, 2, 3]
    survivor = grid[~grid["pruned"].astype(bool)]
    assert json_of(work / "reports" / "train.json")["run_name"] == survivor["run_name"].iloc[0]
    # a second run reuses every epoch: the survivor from the run cache, the pruned trials from their states
    again = run_stage(work, root)
    assert "search: 4 trial(s), halving; 1 reused from the cache, 3 resumed" in again.stdout
    assert " epoch " not in "\n".join(line for line in again.stdout.splitlines() if line.startswith("["))


def json_of(path: Path) -> dict:
    import json

    return json.loads(path.read_text())
