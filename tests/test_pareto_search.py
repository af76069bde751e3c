"""select_by: [METRIC, COST]: counted costs, the Pareto front, the selection rule, and a two-objective tpe search.

The costs are checked against arithmetic done here from the layer specs (a
convolution's multiply-accumulates are out_H x out_W x out_C x in_C x k x k)
and against torchvision's own published operation count; the front against a
brute-force dominance check over random trials; the stage end to end on a
tiny project, with MLflow on.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from cnnpipe.engine.records import EpochRecord, RunResult
from cnnpipe.models.build import build_model
from cnnpipe.models.cost import latency_ms, network_cost
from cnnpipe.models.presets import PRESETS
from cnnpipe.models.spec import normalize_layers
from cnnpipe.search.ask_tell import make_study, told_for
from cnnpipe.search.pareto import OverBudget, choose, pareto_front, select_on_front
from cnnpipe.search.selection import RunRecord, select_best
from cnnpipe.search.space import expand as expand_grid
from synthetic import tiny_params

pytestmark = pytest.mark.long(25)  # the stage runs twice


def _shape(name: str) -> tuple[int, int, int]:
    return (3, 32, 32) if name.startswith("cifar") else (1, 28, 28)


def macs_by_hand(layers: list, in_shape: tuple[int, int, int], num_classes: int) -> int:
    """Convolutions, residual blocks and linear layers, from the spec's inferred shapes."""
    total, shape = 0, in_shape
    for info in normalize_layers("m", list(layers), in_shape, num_classes):
        spec, out = info.spec, info.out_shape
        if spec["type"] == "conv":
            total += out[0] * out[1] * out[2] * shape[0] * spec["kernel"] ** 2
        elif spec["type"] == "residual":
            conv1 = out[0] * out[1] * out[2] * shape[0] * 9
            conv2 = out[0] * out[1] * out[2] * out[0] * 9
            projection = out[0] * out[1] * out[2] * shape[0] if spec["stride"] != 1 or shape[0] != out[0] else 0
            total += conv1 + conv2 + projection
        elif spec["type"] == "linear":
            total += math.prod(shape) * out[0]
        shape = out
    return total


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_costs_what_its_layers_add_up_to(name):
    layers, shape = list(PRESETS[name]), _shape(name)
    cost = network_cost(layers, shape, 10)
    assert cost.macs == macs_by_hand(layers, shape, 10) > 0
    built = build_model(layers, shape, 10)
    assert cost.params == sum(p.numel() for p in built.parameters())
    assert network_cost(layers, shape, 10) == cost  # counted, so the same every time


def test_a_torchvision_network_counts_what_torchvision_publishes():
    from torchvision.models import ResNet18_Weights

    from cnnpipe.models import torchvision_spec as tvs

    cost = network_cost(tvs.layer_spec("resnet18", "none", 3), (3, 224, 224), 1000)
    published = ResNet18_Weights.IMAGENET1K_V1.meta
    assert cost.params == published["num_params"]
    assert cost.macs / 1e9 == pytest.approx(published["_ops"], rel=0.01)  # torchvision's GFLOPS are multiply-adds


def test_latency_is_a_positive_time_and_leaves_the_thread_count_alone():
    threads = torch.get_num_threads()
    ms = latency_ms(PRESETS["small_bn"], (1, 28, 28), 10, repeats=3, warmup=1)
    assert 0 < ms < 10_000 and torch.get_num_threads() == threads


# --------------------------------------------------------------------------- the front and the rule

CONFIGS = expand_grid(tiny_params(lr=[round(0.001 * (i + 1), 4) for i in range(40)], batch_size=32))


def trial(index: int, val_top1: float, macs: int, status: str = "finished") -> RunRecord:
    from cnnpipe.models.cost import NetworkCost

    cfg = CONFIGS[index - 1]
    epoch = EpochRecord(1, 1.0, 0.5, 1.0 - val_top1, val_top1, 0.99, 0.01, 1.0, 100.0)
    result = RunResult(cfg.run_id, status, "max_epochs", 1, epoch, [epoch], 1, 1.0, 100.0, torch.nn.Linear(1, 1), "cpu")
    if status == "failed":
        result = RunResult.failed(cfg.run_id, "RuntimeError: boom")
    rec = RunRecord(index, cfg, result)
    rec.cost = NetworkCost(params=macs // 10, macs=macs)
    return rec


def dominated(point: tuple[float, int], others: list[tuple[float, int]]) -> bool:
    acc, macs = point
    return any(a >= acc and m <= macs and (a, m) != (acc, macs) for a, m in others)


@pytest.mark.parametrize("seed", range(20))
def test_the_front_is_every_trial_no_other_beats_on_both(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 30))
    accs = rng.choice([0.5, 0.6, 0.7, 0.8, 0.9], n)  # few values: ties in either objective happen
    costs = rng.choice([10, 20, 40, 80], n)
    records = [trial(i + 1, float(a), int(c)) for i, (a, c) in enumerate(zip(accs, costs))]
    if n > 2:
        records[1] = trial(2, 0.99, 1, status="failed")  # a failed trial is never on the front, however cheap
    usable = [(rec.metric("val_top1"), rec.cost.macs) for rec in records if rec.ok]
    expected = {rec.index for rec in records if rec.ok and not dominated((rec.metric("val_top1"), rec.cost.macs), usable)}
    front = pareto_front(records, "val_top1", "macs")
    assert {rec.index for rec in front} == expected
    assert [rec.cost.macs for rec in front] == sorted(rec.cost.macs for rec in front)
    for budget in (None, 10, 25, 80):
        affordable = [rec for rec in front if budget is None or rec.cost.macs <= budget]
        if not affordable:
            with pytest.raises(OverBudget):
                select_on_front(records, "val_top1", "macs", budget)
            continue
        chosen = select_on_front(records, "val_top1", "macs", budget)
        assert chosen in front and (budget is None or chosen.cost.macs <= budget)
        assert chosen.metric("val_top1") == max(rec.metric("val_top1") for rec in affordable)
        assert {rec.index for rec in records if rec.on_front} == expected


def test_the_rule_picks_the_most_accurate_within_the_budget_and_says_when_none_fits():
    records = [trial(1, 0.90, 4_000), trial(2, 0.85, 1_000), trial(3, 0.80, 2_000), trial(4, 0.70, 500)]
    assert [rec.index for rec in pareto_front(records, "val_top1", "macs")] == [4, 2, 1]  # 3 is beaten by 2
    assert select_on_front(records, "val_top1", "macs", None) is records[0] is select_best(records, "val_top1")
    assert select_on_front(records, "val_top1", "macs", 3_999) is records[1]
    assert select_on_front(records, "val_top1", "macs", 500) is records[3]
    with pytest.raises(OverBudget) as err:
        select_on_front(records, "val_top1", "macs", 100)
    message = str(err.value)
    assert "\n" not in message and "max_cost=100" in message and "costs 500" in message and "raise max_cost" in message


def test_choose_measures_latency_for_front_trials_only():
    params = tiny_params(lr=[0.01, 0.02], model=["tiny", "wide"], models={
        "tiny": [{"conv": 2, "kernel": 3}, "relu", {"maxpool": 2}, "flatten", "linear"],
        "wide": [{"conv": 8, "kernel": 3}, "relu", {"maxpool": 2}, "flatten", "linear"]})
    configs = expand_grid(params)
    accuracy = {"tiny": 0.8, "wide": 0.9}
    records = []
    for i, cfg in enumerate(configs, start=1):
        top1 = accuracy[cfg.values.model] + (0.01 if cfg.values.lr == 0.01 else 0)
        epoch = EpochRecord(1, 1.0, 0.5, 1 - top1, top1, 0.99, 0.01, 1.0, 100.0)
        records.append(RunRecord(i, cfg, RunResult(cfg.run_id, "finished", "max_epochs", 1, epoch, [epoch], 1, 1.0,
                                                    100.0, torch.nn.Linear(1, 1), "cpu")))
    tiny_macs = network_cost(params.models["tiny"], (1, 28, 28), 10).macs
    best = choose(records, "val_top1", "macs", tiny_macs, in_shape=(1, 28, 28), num_classes=10)
    assert best.cfg.values.model == "tiny" and best.cfg.values.lr == 0.01
    front = [rec for rec in records if rec.on_front]
    assert {(rec.cfg.values.model, rec.cfg.values.lr) for rec in front} == {("tiny", 0.01), ("wide", 0.01)}
    assert all(rec.latency_ms > 0 for rec in front)
    assert all(rec.latency_ms is None for rec in records if not rec.on_front)


def test_a_two_objective_study_is_told_the_value_and_the_cost():
    rec = trial(1, 0.9, 1234)
    assert told_for(rec, "val_top1", 1, cost=1234).value == (0.9, 1234.0)
    assert told_for(rec, "val_top1", 1).value == 0.9
    study = make_study(tiny_params(lr={"log_uniform": [1e-3, 0.1]}, grid={"strategy": "tpe"}).grid, "val_top1", "macs")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]


# --------------------------------------------------------------------------- the train stage, end to end

MODELS = {"narrow": [{"conv": 2, "kernel": 3}, "relu", {"maxpool": 2}, "flatten", "linear"],
          "wide": [{"conv": 8, "kernel": 3}, "relu", {"maxpool": 2}, "flatten", "linear"]}


@pytest.mark.slow
def test_a_two_objective_tpe_stage_selects_on_its_front_and_tags_it_in_mlflow(tmp_path):
    from mlflow import MlflowClient

    from project_builder import run_stage, stage_project

    narrow = network_cost(MODELS["narrow"], (1, 28, 28), 10).params
    work, root = stage_project(
        tmp_path, model=["narrow", "wide"], models=MODELS, lr={"log_uniform": [1e-3, 0.1]}, epochs=1, batch_size=64,
        select_by=["val_top1", "params"], max_cost=narrow,
        grid={"strategy": "tpe", "samples": 6, "batch": 3, "workers": 1})
    done = run_stage(work, root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "val_top1 maximized and params minimized (Pareto front)" in done.stdout
    grid = pd.read_csv(work / "reports" / "grid.csv")
    front = pd.read_csv(work / "reports" / "pareto_front.csv")
    train = json.loads((work / "reports" / "train.json").read_text())
    assert len(grid) == 6 and grid["params"].notna().all() and grid["macs"].notna().all()
    points = list(zip(grid["val_top1"], grid["params"]))
    expected = {run for run, acc, size in zip(grid["run_id"], grid["val_top1"], grid["params"])
                if not dominated((acc, size), points)}
    assert set(front["run_id"]) == expected == set(grid.loc[grid["pareto_front"], "run_id"])
    assert front["latency_ms"].gt(0).all() and grid.loc[~grid["pareto_front"], "latency_ms"].isna().all()
    affordable = front[front["params"] <= narrow]
    assert train["run_id"] == affordable.loc[affordable["val_top1"].idxmax(), "run_id"]
    assert front.loc[front["selected"], "run_id"].tolist() == [train["run_id"]]
    assert (train["select_by"], train["select_cost"], train["max_cost"]) == ("val_top1", "params", narrow)
    assert train["params"] == narrow  # within the budget, so the narrow network

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    children = {run.info.run_id: run for run in client.search_runs(
        [client.get_experiment_by_name("cnnpipe").experiment_id], "tags.`cnnpipe.role` = 'child'")}
    assert set(children) == set(grid["mlflow_run_id"])
    for row in grid.itertuples():
        child = children[row.mlflow_run_id]
        assert child.data.tags["cnnpipe.pareto_front"] == str(bool(row.pareto_front)).lower()
        assert child.data.metrics["params"] == row.params and child.data.metrics["macs"] == row.macs
        assert ("latency_ms" in child.data.metrics) == bool(row.pareto_front)
    parent = client.get_run(train["mlflow_parent_run_id"])
    assert parent.data.metrics["pareto_front_size"] == len(front)
    assert "pareto_front.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # a later run with a raised budget continues the same study: its first 6 trials come from the run cache
    # (told to the sampler, not trained), then 3 new ones are asked and trained
    raised = yaml.safe_load((work / "params.yaml").read_text())
    raised["grid"]["samples"] = 9
    (work / "params.yaml").write_text(yaml.safe_dump(raised, sort_keys=False))
    rerun = run_stage(work, root)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    out = rerun.stdout
    assert "batch 1/3: trials 1-3; 3 reused from the cache" in out and "batch 2/3: trials 4-6; 3 reused from the cache" in out
    assert "batch 3/3: trials 7-9; 0 reused from the cache" in out
    extended = pd.read_csv(work / "reports" / "grid.csv")
    assert extended["run_id"].tolist()[:6] == grid["run_id"].tolist() and len(extended) == 9
    points = list(zip(extended["val_top1"], extended["params"]))
    assert set(extended.loc[extended["pareto_front"], "run_id"]) == {
        run for run, acc, size in zip(extended["run_id"], extended["val_top1"], extended["params"])
        if not dominated((acc, size), points)}
