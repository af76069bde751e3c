"""params.yaml schema: valid files parse, every malformed one gets one clear line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from cnnpipe.cli.main import main as cli_main
from cnnpipe.models.presets import PRESETS
from cnnpipe.params.load import load_params, parse_params
from cnnpipe.params.schema import Params
from cnnpipe.params.values import TRAINING_KEYS, TrainingValues
from cnnpipe.search.space import expand

ROOT = Path(__file__).resolve().parents[1]


def base_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def with_changes(**changes) -> str:
    raw = base_params()
    for key, value in changes.items():
        if "__" in key:
            section, leaf = key.split("__", 1)
            raw.setdefault(section, {})[leaf] = value
        else:
            raw[key] = value
    return yaml.safe_dump(raw, sort_keys=False)


def run_validate(path: Path, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--params", str(path), "validate"])
    return exit_info.value.code, capsys.readouterr().err


def _fields(model: type[BaseModel], prefix: tuple[str, ...] = ()):
    """Every leaf field of the schema: (path, code default), sections walked recursively."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _fields(annotation, (*prefix, name))
        else:
            yield (*prefix, name), info.get_default(call_default_factory=True)


def test_shipped_params_are_valid_and_document_every_key():
    params = load_params(ROOT / "params.yaml")
    assert params.data.dataset == "fashion-mnist"
    lines = (ROOT / "params.yaml").read_text().splitlines()
    for path, _ in _fields(Params):
        indent = "  " * (len(path) - 1)
        line = next((line for line in lines if line.startswith(f"{indent}{path[-1]}:")), None)
        assert line is not None and "#" in line, f"params.yaml does not document {'.'.join(path)}"


def test_every_code_default_equals_the_shipped_params_yaml():
    shipped = base_params()
    fields = list(_fields(Params))
    assert len(fields) >= 40  # the walk reached the sections' leaves (44 today)
    for path, default in fields:
        value = shipped
        for part in path:
            assert part in value, f"params.yaml lacks {'.'.join(path)}"
            value = value[part]
        assert default == value and type(default) in (type(value), float), \
            f"{'.'.join(path)}: code default {default!r}, params.yaml {value!r}"


def test_a_missing_key_means_the_shipped_value():
    assert parse_params({}) == load_params(ROOT / "params.yaml")
    assert parse_params({"lr": 0.5}).model_dump(exclude={"lr"}) == load_params(ROOT / "params.yaml").model_dump(exclude={"lr"})


def test_a_single_run_defaults_to_the_first_shipped_point():
    first = expand(load_params(ROOT / "params.yaml"))[0]
    assert TrainingValues() == first.values
    assert tuple(TrainingValues.model_fields) == TRAINING_KEYS == tuple(Params.model_fields)[:len(TRAINING_KEYS)]


def test_defaults_apply_when_keys_are_missing():
    params = parse_params({})
    assert params.training["lr"] == (0.01, 0.001)
    assert params.axes == ("lr", "batch_size")
    assert params.grid_size == 4
    assert params.eval.top_k == [1, 5]
    assert expand(params)[0].values.model == "small_bn"  # a preset: resolvable without a models: section


def test_expand_grid_is_the_cartesian_product_in_params_order():
    raw = base_params() | {"lr": [0.1, 0.01, 0.001], "batch_size": [10, 20], "shuffle": [True, False]}
    runs = expand(parse_params(raw))
    assert len(runs) == 12
    assert runs[0].name == "lr=0.1,batch_size=10,shuffle=true"
    assert runs[-1].name == "lr=0.001,batch_size=20,shuffle=false"
    assert len({run.run_id for run in runs}) == 12
    assert [r.values.lr for r in runs[:4]] == [0.1] * 4


def test_run_id_is_stable_and_changes_with_anything_trained():
    raw = base_params() | {"lr": 0.01, "batch_size": 100}
    first = expand(parse_params(raw))[0]
    again = expand(parse_params(dict(raw)))[0]
    assert first.run_id == again.run_id
    assert expand(parse_params(raw | {"seed": 7}))[0].run_id != first.run_id
    layers = list(PRESETS["small_bn"])
    original = expand(parse_params(raw | {"model": "mine", "models": {"mine": layers}}))[0]
    changed = expand(parse_params(raw | {"model": "mine", "models": {"mine": layers[:-3] + [{"linear": 64}, "relu", "linear"]}}))[0]
    assert changed.run_id != original.run_id


def test_redefining_a_preset_with_its_own_layers_is_allowed():
    """Older params.yaml files defined small_bn under models: before it became a preset."""
    raw = base_params() | {"models": {"small_bn": list(PRESETS["small_bn"])}}
    assert expand(parse_params(raw))[0].run_id == expand(load_params(ROOT / "params.yaml"))[0].run_id


def test_a_single_value_list_is_not_an_axis():
    params = parse_params(base_params() | {"lr": [0.01], "batch_size": 100})
    assert params.axes == ()
    assert expand(params)[0].name == f"model={params.training['model'][0]}"


def test_augment_auto_resolves_per_dataset():
    fashion = expand(parse_params(base_params() | {"augment": "auto"}))[0]
    digits_raw = base_params() | {"augment": "auto"}
    digits_raw["data"] = dict(digits_raw["data"], dataset="mnist")
    digits = expand(parse_params(digits_raw))[0]
    assert fashion.values.augment == "crop_flip"
    assert digits.values.augment == "none"


BAD_LAYERS = [{"conv": 8, "kernel": 3}, "relu"] + [{"maxpool": 2}] * 5 + ["flatten", "linear"]

MALFORMED = [
    # (id, params.yaml text, words the one-line message must contain)
    ("yaml-syntax", "lr: [0.1, 0.01\nbatch_size: 100\n", ["YAML syntax error", "line"]),
    ("yaml-tab-indent", "data:\n\tdataset: mnist\n", ["YAML syntax error", "line 2"]),
    ("top-level-list", "- lr\n- 0.1\n", ["top level must be a mapping"]),
    ("unknown-key-suggest", with_changes(lrate=0.1), ["unknown key 'lrate'", "did you mean lr?"]),
    ("unknown-key-plain", with_changes(colour="red"), ["unknown key 'colour'"]),
    ("unknown-section-key", with_changes(data__datset="mnist"), ["unknown key 'datset' in data", "did you mean dataset?"]),
    ("unknown-nested-key", with_changes(data__download={"timeot": 3}), ["'timeot' in data.download", "timeout"]),
    ("lr-negative", with_changes(lr=-0.1), ["lr must be > 0", "got -0.1"]),
    ("lr-zero-in-list", with_changes(lr=[0.1, 0]), ["lr[1] must be > 0", "got 0"]),
    ("lr-string", with_changes(lr="fast"), ["lr must be a number", '"fast"']),
    ("lr-bool", with_changes(lr=True), ["lr must be a number", "true"]),
    ("batch-size-zero", with_changes(batch_size=0), ["batch_size must be > 0", "got 0"]),
    ("batch-size-float", with_changes(batch_size=12.5), ["batch_size must be an integer", "12.5"]),
    ("epochs-zero", with_changes(epochs=0), ["epochs must be > 0"]),
    ("patience-negative", with_changes(patience=-1), ["patience must be >= 0", "-1"]),
    ("shuffle-not-bool", with_changes(shuffle="yes"), ["shuffle must be true or false"]),
    ("optimizer-unknown", with_changes(optimizer="rmsprop"), ["optimizer must be one of", "rmsprop"]),
    ("schedule-unknown", with_changes(schedule="step"), ["schedule must be one of", "step"]),
    ("momentum-one", with_changes(momentum=1.0), ["momentum must be < 1"]),
    ("label-smoothing-negative", with_changes(label_smoothing=-0.1), ["label_smoothing must be >= 0"]),
    ("empty-grid-list", with_changes(lr=[]), ["lr is an empty list"]),
    ("duplicate-grid-value", with_changes(batch_size=[100, 100]), ["batch_size lists a value twice"]),
    ("mapping-as-value", with_changes(lr={"min": 0.1}), ["lr must be a value, a list of values or a range", '{"min": 0.1}']),
    ("nested-list", with_changes(lr=[[0.1, 0.2]]), ["lr[0] must be a number, got [0.1, 0.2]"]),
    ("lr-infinite", "lr: .inf\n", ["lr must be a finite number"]),
    ("grid-too-large", with_changes(lr=[0.1 * (i + 1) for i in range(9)], batch_size=list(range(1, 9))),
     ["72 runs", "grid.max_runs=64"]),
    ("val-fraction-one", with_changes(data__val_fraction=1.0), ["data.val_fraction must be < 1", "1.0"]),
    ("val-fraction-zero", with_changes(data__val_fraction=0), ["data.val_fraction must be > 0"]),
    ("unknown-dataset", with_changes(data__dataset="cifar100"), ["data.dataset must be one of", "cifar100", "did you mean cifar10?"]),
    ("unknown-model", with_changes(model="resnet50"), ["model: unknown model 'resnet50'", "preset"]),
    ("unknown-model-in-grid", with_changes(model=["fashion_tutorial", "small_bm"]), ["model[1]", "did you mean small_bn?"]),
    ("bad-layer-pool", with_changes(model="fashion_tutorial", models={"tiny": BAD_LAYERS}), ["models.tiny[6]", "maxpool 2 on a 8x1x1 feature map"]),
    ("bad-layer-type", with_changes(model="fashion_tutorial", models={"tiny": [{"convolution": 8}, "flatten", "linear"]}), ["models.tiny[0]", "unknown layer type 'convolution'"]),
    ("bad-layer-linear-before-flatten", with_changes(model="fashion_tutorial", models={"tiny": [{"conv": 4}, {"linear": 10}]}), ["models.tiny[1]", "add 'flatten'"]),
    ("bad-layer-wrong-classes", with_changes(model="fashion_tutorial", models={"tiny": ["flatten", {"linear": 7}]}), ["models.tiny[1]", "7 outputs", "10 classes"]),
    ("bad-layer-option", with_changes(model="fashion_tutorial", models={"tiny": [{"conv": 4, "kernal": 3}, "flatten", "linear"]}), ["models.tiny[0]", "no option 'kernal'"]),
    ("preset-name-clash", with_changes(models={"mnist_net": ["flatten", "linear"]}), ["models.mnist_net clashes"]),
    ("top-k-too-large", with_changes(eval={"top_k": [1, 11]}), ["eval.top_k has 11", "10 classes"]),
    ("top-k-zero", with_changes(eval={"top_k": [0]}), ["eval.top_k[0] must be > 0"]),
    ("mirror-bad-scheme", with_changes(data__mirrors=["ftp://example.org/mnist/"]), ["data.mirrors[0]", "unsupported scheme 'ftp'"]),
    ("checksum-not-hex", with_changes(data__checksums={"train-images-idx3-ubyte.gz": "abc"}), ["data.checksums", "SHA-256"]),
    ("timeout-negative", with_changes(data__download={"timeout": -1}), ["data.download.timeout must be > 0"]),
    ("workers-zero", with_changes(grid={"workers": 0}), ["grid.workers must be 'auto' or an integer > 0"]),
    ("backend-unknown", with_changes(grid={"backend": "dask"}), ["grid.backend must be one of", "dask"]),
    ("mlflow-enabled-not-bool", with_changes(mlflow={"enabled": "maybe"}), ["mlflow.enabled must be true or false"]),
    ("select-by-test", with_changes(select_by="test_top1"), ["select_by must be one of", "test_top1"]),
    # select_by [METRIC, COST] (issue 32): a counted cost, a search that ranks by both, a budget only with a cost
    ("select-by-latency", with_changes(select_by=["val_top1", "latency_ms"]),
     ["select_by: latency_ms is measured", "never selected by; use [val_top1, macs]"]),
    ("select-by-cost-typo", with_changes(select_by=["val_top1", "mac"]), ['unknown cost "mac" (did you mean macs?)']),
    ("select-by-cost-alone", with_changes(select_by="macs"), ["select_by must be one of", "[METRIC, COST]", '"macs"']),
    ("select-by-three", with_changes(select_by=["val_top1", "macs", "params"]), ["select_by must be one of"]),
    ("select-by-cost-with-halving", with_changes(select_by=["val_top1", "macs"], grid={"strategy": "halving"}),
     ["has two objectives, but grid.strategy: halving ranks trials by one metric"]),
    ("select-by-cost-with-pruning", with_changes(select_by=["val_loss", "params"], lr={"log_uniform": [1e-3, 0.1]},
                                                 grid={"strategy": "tpe", "prune": "halving"}),
     ["grid.prune: halving ranks trials by one metric"]),
    ("max-cost-without-a-cost", with_changes(max_cost=1.0e6), ["max_cost=1e+06 is a budget for a cost", "max_cost: null"]),
    ("max-cost-negative", with_changes(select_by=["val_top1", "macs"], max_cost=-5), ["max_cost must be > 0"]),
    ("device-unknown", with_changes(device="tpu"), ["device must be one of", "tpu"]),
    ("section-not-mapping", with_changes(data="mnist"), ["data must be a mapping"]),
    ("empty-file", "", ["the file has no keys", "git checkout params.yaml"]),
    ("only-comments", "# lr: 0.1\n# batch_size: 100\n", ["the file has no keys"]),
    ("non-string-key", "1: 2\n", ["keys must be strings"]),
    ("workers-word", with_changes(grid={"workers": "many"}), ['grid.workers must be \'auto\' or an integer > 0, got "many"']),
    # search params (issue 13): one line each, before any training
    ("eta-one", with_changes(grid__eta=1), ["grid.eta must be >= 2, got 1"]),
    ("min-epochs-zero", with_changes(grid__min_epochs=0), ["grid.min_epochs must be > 0"]),
    ("min-epochs-over-epochs", with_changes(grid={"strategy": "halving", "min_epochs": 20}),
     ["grid.min_epochs=20 is more than epochs=10", "lower grid.min_epochs or raise epochs"]),
    ("min-epochs-over-an-epochs-value", with_changes(epochs=[20, 5], grid={"strategy": "halving", "min_epochs": 10}),
     ["grid.min_epochs=10 is more than epochs=5"]),
    ("min-epochs-over-an-epochs-range", with_changes(epochs={"int_uniform": [3, 30]}, grid={"strategy": "halving", "min_epochs": 10}),
     ["grid.min_epochs=10 is more than epochs=3"]),
    ("range-low-above-high", with_changes(lr={"log_uniform": [0.1, 0.01]}), ["lr {log_uniform: [0.1, 0.01]} needs lo < hi"]),
    ("range-low-equals-high", with_changes(weight_decay={"uniform": [0.1, 0.1]}), ["weight_decay {uniform: [0.1, 0.1]} needs lo < hi"]),
    ("int-range-low-above-high", with_changes(batch_size={"int_uniform": [512, 32]}), ["batch_size {int_uniform: [512, 32]} needs lo < hi"]),
    ("log-uniform-touches-zero", with_changes(weight_decay={"log_uniform": [0, 0.1]}), ["needs lo > 0", "use uniform to include 0"]),
    ("log-uniform-negative", with_changes(lr={"log_uniform": [-1, 0.1]}), ["lr {log_uniform: [-1, 0.1]} needs lo > 0"]),
    ("range-not-a-pair", with_changes(lr={"uniform": [0.1]}), ["lr {uniform: ...} must hold two finite numbers [lo, hi], got [0.1]"]),
    ("range-bound-breaks-key-rule", with_changes(momentum={"uniform": [0.5, 1.5]}), ["momentum.uniform[1] must be < 1, got 1.5"]),
    ("samples-zero", with_changes(grid__samples=0), ["grid.samples must be > 0, got 0"]),
    ("samples-over-max-runs", with_changes(lr={"log_uniform": [1e-4, 0.1]}, grid__samples=100),
     ["grid.samples=100 is more than grid.max_runs=64"]),
    ("uniform-on-model", with_changes(model={"uniform": [0, 1]}), ["model cannot be drawn from uniform: use {choice: [v1, v2, ...]}"]),
    ("log-uniform-on-optimizer", with_changes(optimizer={"log_uniform": [0.1, 1]}), ["optimizer cannot be drawn from log_uniform", "use {choice"]),
    ("uniform-on-bool", with_changes(shuffle={"uniform": [0, 1]}), ["shuffle cannot be drawn from uniform", "use {choice"]),
    ("uniform-on-whole-numbers", with_changes(batch_size={"log_uniform": [32, 512]}),
     ["batch_size cannot be drawn from log_uniform: use {int_uniform: [lo, hi]} or {choice"]),
    ("int-uniform-on-float", with_changes(lr={"int_uniform": [1, 3]}), ["lr cannot be drawn from int_uniform", "{log_uniform"]),
    ("int-uniform-fractional", with_changes(epochs={"int_uniform": [1.5, 3]}), ["epochs.int_uniform[0] must be an integer, got 1.5"]),
    ("unknown-range-kind", with_changes(lr={"normal": [0, 1]}), ["lr must be a value, a list of values or a range", "normal"]),
    ("range-with-two-kinds", with_changes(lr={"uniform": [0.1, 1], "choice": [1]}), ["lr must be a value, a list of values or a range"]),
    ("choice-empty", with_changes(batch_size={"choice": []}), ["batch_size.choice is an empty list"]),
    ("choice-bad-value", with_changes(batch_size={"choice": [64, 0]}), ["batch_size.choice[1] must be > 0, got 0"]),
    ("choice-twice", with_changes(optimizer={"choice": ["adam", "adam"]}), ["optimizer.choice lists a value twice"]),
    ("choice-unknown-model", with_changes(model={"choice": ["small_bn", "fashion_tutorail"]}),
     ["model.choice[1]: unknown model 'fashion_tutorail'", "did you mean fashion_tutorial?"]),
    ("halving-single-point", with_changes(lr=0.01, batch_size=100, grid__strategy="halving"),
     ["grid.strategy halving needs at least 2 points", "grid.strategy: exhaustive"]),
    ("strategy-unknown", with_changes(grid__strategy="hyperband"), ["grid.strategy must be one of 'exhaustive', 'halving' or 'tpe'"]),
    ("search-seed-negative", with_changes(grid__search_seed=-1), ["grid.search_seed must be >= 0"]),
    ("points-over-max-runs", with_changes(lr=[0.1, 0.01, 0.001, 0.0001], weight_decay={"uniform": [0, 0.1]}, grid__samples=10),
     ["80 runs", "10 samples of weight_decay~uniform[0.0, 0.1]", "grid.max_runs=64", "lower grid.samples"]),
    ("drawn-value-breaks-key-rule", with_changes(momentum={"uniform": [0.99996, 0.99999]}),
     ["momentum must be < 1, got 1.0", "drawn from momentum", "narrow the range"]),
    ("drawn-points-repeat", with_changes(lr=0.01, batch_size={"choice": [64, 128]}),
     ["are the same config", "grid.samples=8 draws repeat a point"]),
    ("auto-repeats-a-listed-value", with_changes(monitor=["auto", "val_loss"]), ["are the same config", "monitor = select_by"]),
    # grid.strategy: tpe (issue 32)
    ("tpe-nothing-to-search", with_changes(lr=0.01, batch_size=[100], grid__strategy="tpe"),
     ["grid.strategy tpe has nothing to search", "a list of 2+ values or a range", "grid.strategy: exhaustive"]),
    ("tpe-budget-over-max-runs", with_changes(grid={"strategy": "tpe", "samples": 65}),
     ["grid.samples=65 (tpe's trial budget) is more than grid.max_runs=64"]),
    ("tpe-range-end-breaks-key-rule", with_changes(momentum={"uniform": [0.5, 0.99999]}, grid__strategy="tpe"),
     ["momentum must be < 1, got 1.0 (suggested from momentum", "narrow the range"]),
    ("batch-zero", with_changes(grid={"strategy": "tpe", "batch": 0}), ["grid.batch must be > 0, got 0"]),
    ("prune-unknown", with_changes(grid={"strategy": "tpe", "prune": "hyperband"}), ["grid.prune must be one of", "hyperband"]),
    ("prune-without-tpe", with_changes(grid={"strategy": "exhaustive", "prune": "halving"}),
     ["grid.prune: halving prunes inside the batches of grid.strategy: tpe", "grid.strategy: halving"]),
    ("prune-batch-of-one", with_changes(grid={"strategy": "tpe", "prune": "halving", "batch": 1}),
     ["grid.prune: halving ranks the trials of a batch", "grid.batch is 1"]),
    ("prune-min-epochs-over-epochs", with_changes(grid={"strategy": "tpe", "prune": "halving", "min_epochs": 20}),
     ["grid.min_epochs=20 is more than epochs=10"]),
]


@pytest.mark.parametrize("text,expected", [(t, e) for _, t, e in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_malformed_params_give_one_line_and_exit_2(tmp_path, capsys, text, expected):
    path = write(tmp_path, text)
    before = sorted(p.name for p in tmp_path.iterdir())
    code, err = run_validate(path, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: ")
    assert "Traceback" not in err
    for words in expected:
        assert words in lines[0], f"{words!r} not in {lines[0]!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_there_are_at_least_80_malformed_cases():
    assert len(MALFORMED) >= 80


def test_missing_params_file_is_one_line(tmp_path, capsys):
    code, err = run_validate(tmp_path / "nope.yaml", capsys)
    assert code == 2
    assert "file not found" in err and len(err.strip().splitlines()) == 1


def test_validate_prints_the_grid(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--params", str(ROOT / "params.yaml"), "validate"])
    assert exit_info.value.code == 0
    assert "4 run(s) (lr(2) x batch_size(2))" in capsys.readouterr().out


def _cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnpipe", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def test_subprocess_error_has_no_traceback_and_debug_shows_one(tmp_path):
    write(tmp_path, with_changes(lr=-1))
    quiet = _cli(["validate"], tmp_path, {"CNNPIPE_DEBUG": ""})
    assert quiet.returncode == 2
    assert quiet.stderr.strip() == "error: params.yaml: lr must be > 0, got -1"
    loud = _cli(["validate"], tmp_path, {"CNNPIPE_DEBUG": "1"})
    assert loud.returncode != 0
    assert "Traceback" in loud.stderr and "ParamsError" in loud.stderr


def test_show_model_prints_shapes_and_parameter_count(tmp_path):
    result = _cli(["--params", str(ROOT / "params.yaml"), "show-model", "fashion_tutorial"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "12x4x4" in result.stdout  # after the second pool
    # conv 6@5: 156, conv 12@5: 1812, fc 192->120: 23160, 120->60: 7260, 60->10: 610
    assert "total parameters: 32,998" in result.stdout


def test_monitor_auto_follows_select_by_and_an_explicit_one_stays():
    for select_by in ("val_loss", "val_top1"):
        runs = expand(parse_params(base_params() | {"select_by": select_by}))
        assert {run.values.monitor for run in runs} == {select_by}
    explicit = expand(parse_params(base_params() | {"select_by": "val_top1", "monitor": "val_loss"}))
    assert {run.values.monitor for run in explicit} == {"val_loss"}
    # the default recipe trains the same runs as when monitor said val_loss outright (run cache still hits)
    old = expand(parse_params(base_params() | {"monitor": "val_loss"}))
    assert [run.run_id for run in expand(load_params(ROOT / "params.yaml"))] == [run.run_id for run in old]


def _validate_out(tmp_path: Path, capsys, **changes) -> str:
    path = write(tmp_path, with_changes(**changes))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--params", str(path), "validate"])
    out = capsys.readouterr()
    assert exit_info.value.code == 0, out.err
    return out.out


def test_validate_notes_a_monitor_that_disagrees_with_select_by(tmp_path, capsys):
    assert "note:" not in _validate_out(tmp_path, capsys)
    out = _validate_out(tmp_path, capsys, monitor="val_top1")
    assert out.count("\n") == 2 and "note: monitor val_top1 stops runs early on another metric than select_by val_loss" in out


def test_validate_names_the_strategy_and_the_sampled_axes(tmp_path, capsys):
    assert _validate_out(tmp_path, capsys).rstrip().endswith("(lr(2) x batch_size(2)), exhaustive")
    out = _validate_out(tmp_path, capsys, grid={"strategy": "halving"}, epochs=9)
    assert "4 run(s) (lr(2) x batch_size(2)), successive halving (eta 3, rungs at 1, 3, 9 epochs)" in out
    out = _validate_out(tmp_path, capsys, lr={"log_uniform": [1e-4, 0.1]}, batch_size={"choice": [64, 128]},
                        model=["small_bn", "fashion_tutorial"], grid={"samples": 5})
    assert "10 run(s) (model(2) x 5 samples of lr~log_uniform[0.0001, 0.1], batch_size~choice[64, 128])" in out


def test_validate_names_a_tpe_search_and_its_space(tmp_path, capsys):
    out = _validate_out(tmp_path, capsys, lr={"log_uniform": [1e-4, 0.1]}, grid={"strategy": "tpe", "samples": 16})
    assert ("16 run(s) (tpe over lr~log_uniform[0.0001, 0.1], batch_size~choice[100, 1000]), "
            "tpe (Optuna TPE, batches of 4, search_seed 0)") in out
    out = _validate_out(tmp_path, capsys, epochs=9, grid={"strategy": "tpe", "prune": "halving", "batch": 8})
    assert out.rstrip().endswith("tpe (Optuna TPE, batches of 8, search_seed 0), successive halving "
                                 "(eta 3, rungs at 1, 3, 9 epochs) in each batch")


def test_grid_size_counts_sampled_points():
    params = parse_params(base_params() | {"weight_decay": {"uniform": [0, 0.1]}, "grid": {"samples": 3}})
    assert params.axes == ("lr", "batch_size", "weight_decay")
    assert params.grid_size == 2 * 2 * 3 == len(expand(params))
    assert params.training.keys().isdisjoint(params.ranges) and set(params.training) | set(params.ranges) == set(TRAINING_KEYS)


@pytest.mark.parametrize("min_epochs,eta,epochs,rungs", [
    (1, 3, 9, (1, 3, 9)), (1, 3, 10, (1, 3, 9, 10)), (2, 2, 10, (2, 4, 8, 10)), (5, 3, 5, (5,)), (1, 4, 1, (1,)),
])
def test_halving_rungs_are_min_epochs_times_eta_powers_capped_by_epochs(min_epochs, eta, epochs, rungs):
    grid = parse_params({"grid": {"min_epochs": min_epochs, "eta": eta}}).grid
    assert grid.rungs(epochs) == rungs


def test_the_error_formatter_reads_only_loc_msg_and_input():
    """The line is built from pydantic's public ``loc``/``msg`` (no error ``type``, ``ctx`` or internal loc names)."""
    from functools import partial

    from cnnpipe.params.messages import _describe as describe
    from cnnpipe.params.schema import Params
    from cnnpipe.params.values import TRAINING_KEYS

    _describe = partial(describe, model=Params, axis_keys=TRAINING_KEYS)
    assert _describe({"loc": ("lr", "list", 1), "msg": "Input should be greater than 0", "input": 0}) == "lr[1] must be > 0, got 0"
    assert _describe({"loc": ("data", "datset"), "msg": "Extra inputs are not permitted", "input": "x"}) == \
        "unknown key 'datset' in data, did you mean dataset?"
    assert _describe({"loc": ("optimizer", "value"), "msg": "Input should be 'adam', 'adamw' or 'sgd'", "input": "rms"}) == \
        "optimizer must be one of 'adam', 'adamw' or 'sgd', got \"rms\""
    assert _describe({"loc": ("grid", "eta"), "msg": "Input should be greater than or equal to 2", "input": 1}) == \
        "grid.eta must be >= 2, got 1"
    assert _describe({"loc": (), "msg": "the grid has 80 runs"}) == "the grid has 80 runs"
