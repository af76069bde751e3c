"""The per-run cache: hits only when nothing that affects training changed."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml

from cnnpipe.params import parse_params
from cnnpipe.store.runs import RunCache, cache_key
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
