"""The per-run cache: hits only when nothing that affects training changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from cnnpipe.params.load import parse_params
from cnnpipe.store.run_cache import RunCache, cache_key
from cnnpipe.search.space import expand

ROOT = Path(__file__).resolve().parents[1]


def config(**changes):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text()) | {"lr": 0.01, "batch_size": 100} | changes
    return expand(parse_params(raw))[0]


def test_put_then_get_round_trips_record_and_weights(tmp_path):
    cache = RunCache(tmp_path)
    state = {"0.weight": torch.arange(6.0).reshape(2, 3), "0.bias": torch.zeros(2)}
    key = cache_key(config(), "fp1", "cpu", code="c1")
    assert cache.get(key) is None
    cache.put(key, {"status": "finished", "best_epoch": 3}, state)
    hit = cache.get(key)
    assert hit is not None and hit.record["best_epoch"] == 3
    assert torch.equal(hit.state_dict["0.weight"], state["0.weight"])


def test_key_changes_with_everything_that_affects_training():
    base = cache_key(config(), "fp1", "cpu", code="c1")
    assert cache_key(config(), "fp1", "cpu", code="c1") == base
    other_model = "fashion_tutorial" if config().values.model != "fashion_tutorial" else "small_bn"
    variants = [
        cache_key(config(lr=0.02), "fp1", "cpu", code="c1"),
        cache_key(config(seed=1), "fp1", "cpu", code="c1"),
        cache_key(config(augment="flip"), "fp1", "cpu", code="c1"),
        cache_key(config(model=other_model), "fp1", "cpu", code="c1"),
        cache_key(config(), "fp2", "cpu", code="c1"),
        cache_key(config(), "fp1", "cuda:0", code="c1"),
        cache_key(config(), "fp1", "cpu", code="c2"),
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_editing_a_layer_spec_changes_the_key():
    from cnnpipe.models.presets import PRESETS

    layers = [dict(layer) if isinstance(layer, dict) else layer for layer in PRESETS["small_bn"]]
    wider = [{"conv": 24, "kernel": 3, "padding": 1}, *layers[1:]]
    a = cache_key(config(model="mine", models={"mine": layers}), "fp", "cpu", code="c")
    b = cache_key(config(model="mine", models={"mine": wider}), "fp", "cpu", code="c")
    assert a != b


def test_corrupt_or_foreign_entries_are_misses_not_errors(tmp_path):
    cache = RunCache(tmp_path)
    key = cache_key(config(), "fp", "cpu", code="c")
    entry = cache.put(key, {"status": "finished"}, {"w": torch.ones(2)})
    (entry / "model.safetensors").write_bytes(b"\x80\x04not safetensors")
    assert cache.get(key) is None
    entry = cache.put(key, {"status": "finished"}, {"w": torch.ones(2)})
    (entry / "result.json").write_text("{truncated")
    assert cache.get(key) is None
    other = cache.put("someotherkey", {"status": "finished"}, {"w": torch.ones(2)})
    shutil.rmtree(entry)
    shutil.copytree(other, entry)  # an entry filed under the wrong key
    assert cache.get(key) is None


def test_no_cache_misses_every_lookup_but_still_stores(tmp_path, monkeypatch):
    """CNNPIPE_NO_CACHE is the code-keyed store's rule (store.outputs), the same for runs as for reports and figures."""
    cache = RunCache(tmp_path)
    key = cache_key(config(), "fp", "cpu", code="c")
    monkeypatch.setenv("CNNPIPE_NO_CACHE", "1")
    cache.put(key, {"status": "finished"}, {"w": torch.ones(2)})
    assert cache.get(key) is None and (tmp_path / key / "result.json").is_file()
    monkeypatch.delenv("CNNPIPE_NO_CACHE")
    assert cache.get(key) is not None


# ----------------------------------------------------------------- every schema field is in every key
# The cases come from the schema (``TrainingValues.model_fields``), never a hand-kept list: a
# key that ignored any training key (``weight_decay``, say) fails here.

def _changed(name: str, values):
    """``values`` with field ``name`` set to another value the schema accepts (derived from its type)."""
    from typing import Literal, get_args, get_origin

    from pydantic import ValidationError

    from cnnpipe.params.values import TrainingValues

    field = TrainingValues.model_fields[name]
    current = getattr(values, name)
    kind = field.annotation
    if get_origin(kind) is Literal:
        candidates = [option for option in get_args(kind) if option != current]
    elif kind is bool:
        candidates = [not current]
    elif kind is int:
        candidates = [current + 1, current * 2, current - 1]
    elif kind is float:
        candidates = [current + 0.5, current / 2, (current + 1) / 2, current * 2]
    elif kind is str:
        candidates = [current + "_other", "other"]
    else:
        raise AssertionError(f"no perturbation for {name}: {kind!r}; teach _changed this type")
    for candidate in candidates:
        try:
            changed = TrainingValues.model_validate(values.model_dump() | {name: candidate})
        except ValidationError:
            continue
        if getattr(changed, name) != current:
            return changed
    raise AssertionError(f"no other valid value for {name} among {candidates}")


def _with_values(cfg, values):
    return cfg.model_copy(update={"values": values})


def _training_fields():
    from cnnpipe.params.values import TrainingValues

    return list(TrainingValues.model_fields)


def test_every_training_field_changes_the_cache_key_and_the_run_id():
    cfg = config()
    assert len(_training_fields()) >= 17
    base, base_id = cache_key(cfg, "fp", "cpu", code="c"), cfg.run_id
    keys, ids = {}, {}
    for name in _training_fields():
        other = _with_values(cfg, _changed(name, cfg.values))
        keys[name], ids[name] = cache_key(other, "fp", "cpu", code="c"), other.run_id
    assert [name for name, key in keys.items() if key == base] == []
    assert [name for name, run_id in ids.items() if run_id == base_id] == []
    assert len(set(keys.values())) == len(keys) and len(set(ids.values())) == len(ids)


def test_every_run_config_field_but_axes_changes_the_cache_key_and_the_run_id():
    """``layers`` and ``dataset`` decide what is trained; ``axes`` only names the run, ``weights_dir`` only
    says where the pinned weights (whose SHA-256 is in ``layers``) are read from."""
    from cnnpipe.params.run_config import RunConfig

    cfg = config()
    base, base_id = cache_key(cfg, "fp", "cpu", code="c"), cfg.run_id
    changes = {
        "values": _changed("lr", cfg.values),
        "layers": (*cfg.layers, {"dropout": 0.1}),
        "dataset": cfg.dataset + "-other",
        "axes": ("lr", "seed"),
        "weights_dir": "elsewhere/weights",
    }
    assert set(changes) == set(RunConfig.model_fields)  # a new RunConfig field must be added here
    unchanged = [name for name, value in changes.items()
                 if cache_key(cfg.model_copy(update={name: value}), "fp", "cpu", code="c") == base]
    assert unchanged == ["axes", "weights_dir"]
    assert [name for name, value in changes.items()
            if cfg.model_copy(update={name: value}).run_id == base_id] == ["axes", "weights_dir"]


def test_every_training_field_changes_the_state_key_but_epochs_without_a_schedule():
    """The run-state key ignores ``epochs`` exactly when ``schedule: none`` (a state continues to more epochs)."""
    from cnnpipe.store.states import state_key

    cfg = config()
    assert cfg.values.schedule == "none"
    base = state_key(cfg, "fp", "cpu", code="c")
    same = [name for name in _training_fields()
            if state_key(_with_values(cfg, _changed(name, cfg.values)), "fp", "cpu", code="c") == base]
    assert same == ["epochs"]
    scheduled = _with_values(cfg, cfg.values.model_copy(update={"schedule": "cosine"}))
    base = state_key(scheduled, "fp", "cpu", code="c")
    same = [name for name in _training_fields()
            if state_key(_with_values(scheduled, _changed(name, scheduled.values)), "fp", "cpu", code="c") == base]
    assert same == []
    for changed in (state_key(cfg, "fp2", "cpu", code="c"), state_key(cfg, "fp", "cuda:0", code="c"),
                    state_key(cfg, "fp", "cpu", code="c2")):
        assert changed != state_key(cfg, "fp", "cpu", code="c")
