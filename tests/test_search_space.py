"""The search space: list axes x drawn points, a pure function of params.yaml."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from cnnpipe.util.errors import ParamsError
from cnnpipe.params.load import load_params, parse_params
from cnnpipe.search.space import expand, round_sig, sample_points

ROOT = Path(__file__).resolve().parents[1]


def shipped(**changes) -> dict:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    grid = changes.pop("grid", {})
    return raw | changes | {"grid": raw["grid"] | grid}


SAMPLED = dict(lr={"log_uniform": [1.0e-4, 1.0e-1]}, weight_decay={"uniform": [0, 0.1]},
               batch_size={"choice": [64, 128, 256]}, epochs={"int_uniform": [2, 5]})


def test_without_ranges_it_is_the_cartesian_product_in_params_order():
    runs = expand(load_params(ROOT / "params.yaml"))
    assert [run.name for run in runs] == ["lr=0.01,batch_size=100", "lr=0.01,batch_size=1000",
                                          "lr=0.001,batch_size=100", "lr=0.001,batch_size=1000"]


def test_same_params_give_the_same_points_and_another_seed_others():
    first = expand(parse_params(shipped(**SAMPLED)))
    again = expand(parse_params(shipped(**SAMPLED)))
    assert [run.run_id for run in first] == [run.run_id for run in again]
    assert [run.flat() for run in first] == [run.flat() for run in again]
    other = expand(parse_params(shipped(**SAMPLED, grid={"search_seed": 1})))
    assert len(other) == len(first) == 8
    assert {run.values.lr for run in other}.isdisjoint({run.values.lr for run in first})


def test_ranges_are_axes_drawn_jointly_and_named():
    params = parse_params(shipped(**SAMPLED, grid={"samples": 6}))
    assert params.axes == ("lr", "batch_size", "epochs", "weight_decay")
    runs = expand(params)
    assert len(runs) == params.grid_size == 6
    for run in runs:
        v = run.values
        assert 1e-4 <= v.lr <= 0.1 and 0 <= v.weight_decay <= 0.1
        assert v.batch_size in (64, 128, 256) and isinstance(v.epochs, int) and 2 <= v.epochs <= 5
        assert run.name == (f"lr={v.lr},batch_size={v.batch_size},epochs={v.epochs},weight_decay={v.weight_decay}")
    assert len({run.values.lr for run in runs}) == 6  # one joint draw per point, not one per key


def test_list_axes_cross_the_same_drawn_points():
    params = parse_params(shipped(model=["small_bn", "fashion_tutorial"], lr={"log_uniform": [1e-4, 0.1]},
                                  batch_size=100, grid={"samples": 3}))
    runs = expand(params)
    assert [run.values.model for run in runs] == ["small_bn"] * 3 + ["fashion_tutorial"] * 3
    assert [run.values.lr for run in runs[:3]] == [run.values.lr for run in runs[3:]]
    assert runs[0].name.startswith("model=small_bn,lr=")
    # adding a list axis does not move the drawn points
    alone = expand(parse_params(shipped(lr={"log_uniform": [1e-4, 0.1]}, batch_size=100, grid={"samples": 3})))
    assert [run.values.lr for run in alone] == [run.values.lr for run in runs[:3]]


def test_drawn_floats_have_four_significant_digits_and_paste_back():
    runs = expand(parse_params(shipped(lr={"log_uniform": [1e-6, 1.0]}, weight_decay={"uniform": [0, 0.1]},
                                       batch_size=100, grid={"samples": 32})))
    for run in runs:
        for key in ("lr", "weight_decay"):
            value = getattr(run.values, key)
            assert round_sig(value) == value and len(f"{value:e}".split("e")[0].replace(".", "").rstrip("0")) <= 4
            # the value shown in the run name, set back with `dvc exp run -S key=...`, is the same point
            shown = dict(part.split("=") for part in run.name.split(","))[key]
            again = expand(parse_params(shipped(**({"lr": 0.01, "batch_size": 100} | {key: yaml.safe_load(shown)}))))[0]
            assert getattr(again.values, key) == value


def test_log_uniform_spreads_over_decades_and_int_uniform_reaches_both_ends():
    runs = expand(parse_params(shipped(lr={"log_uniform": [1e-4, 1e-1]}, epochs={"int_uniform": [2, 4]},
                                       batch_size=100, grid={"samples": 60})))
    decades = {math.floor(math.log10(run.values.lr)) for run in runs}
    assert decades == {-4, -3, -2}
    assert {run.values.epochs for run in runs} == {2, 3, 4}


def test_choice_keeps_the_values_as_written():
    runs = expand(parse_params(shipped(lr=0.01, batch_size=100, weight_decay={"uniform": [0, 0.1]},
                                       optimizer={"choice": ["adam", "sgd"]}, shuffle={"choice": [True, False]},
                                       grid={"samples": 16})))
    assert {run.values.optimizer for run in runs} == {"adam", "sgd"}
    assert {run.values.shuffle for run in runs} == {True, False}


def test_sample_points_is_one_empty_point_without_ranges():
    assert sample_points(load_params(ROOT / "params.yaml")) == [{}]


def test_ranges_combine_with_halving():
    params = parse_params(shipped(lr={"log_uniform": [1e-4, 0.1]}, batch_size=[100, 1000],
                                  grid={"strategy": "halving", "samples": 4}))
    assert params.grid.strategy == "halving" and len(expand(params)) == 8


def test_a_drawn_value_breaking_its_rule_is_one_line():
    with pytest.raises(ParamsError) as info:
        expand(parse_params(shipped(momentum={"uniform": [0.99996, 0.99999]})))
    assert str(info.value).startswith("params.yaml: momentum must be < 1, got 1.0 (drawn from momentum")
    assert "\n" not in str(info.value)


def test_every_module_of_the_search_space_imports_alone():
    import subprocess
    import sys

    for module in ("cnnpipe.search", "cnnpipe.search.space"):
        done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr


def test_params_with_ranges_pickle_for_workers():
    import pickle

    params = parse_params(shipped(**SAMPLED))
    again = pickle.loads(pickle.dumps(params))
    assert again == params and [run.run_id for run in expand(again)] == [run.run_id for run in expand(params)]
