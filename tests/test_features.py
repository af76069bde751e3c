"""Cached backbone features: a linear probe's grid trains on a frozen body's outputs computed once.

The weights are made here (nothing can be downloaded): a randomly initialised
``mobilenet_v3_small`` state dict under torchvision's own cache file name,
fetched by the real weights stage code into a ``data/weights`` folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

from cnnpipe.engine.data import TrainData
from cnnpipe.engine.loop import train_run
from cnnpipe.pretrained import fetch as pw
from cnnpipe.models import torchvision_spec as tvs
from cnnpipe.models.build import build_model
from cnnpipe.params.load import parse_params
from cnnpipe.search.space import expand
from cnnpipe.store import features as feats
from cnnpipe.codegraph.code_identity import code_identity
from cnnpipe.util.env import FEATURES, NO_CACHE

ARCH = "mobilenet_v3_small"
QUIET: dict[str, Any] = {"progress": False, "num_threads": 1}


def params(**changes: Any):  # type: ignore[no-untyped-def]
    raw: dict[str, Any] = {"model": f"{tvs.PREFIX}{ARCH}", "finetune": "head", "lr": [0.01, 0.003],
                           "batch_size": 100, "epochs": 3, "patience": 5, "data": {"dataset": "fashion-mnist"}}
    return parse_params(raw | changes)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``data/weights`` holding IMAGENET1K_V1 of ``ARCH`` (random values), fetched from a placed torch hub cache."""
    home = tmp_path_factory.mktemp("torch_home")
    url = torchvision.models.get_model_weights(ARCH)["IMAGENET1K_V1"].url
    target = home / "hub" / "checkpoints" / os.path.basename(url)
    target.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.get_model(ARCH, weights=None).state_dict(), target)
    folder = tmp_path_factory.mktemp("weights") / "weights"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(home))
        pw.fetch_weights(params(), folder, progress=False)
    return folder


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("CNNPIPE_CACHE_DIR", str(tmp_path / "cache" / "runs"))
    monkeypatch.delenv(FEATURES, raising=False)
    monkeypatch.delenv(NO_CACHE, raising=False)
    return tmp_path / "cache" / "features"


def entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


@pytest.mark.slow
def test_a_head_grid_computes_the_features_once_and_selects_as_training_through_the_body(
        weights: Path, tiny_prepared: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = TrainData.load(tiny_prepared)
    first, second = expand(params(), weights_dir=weights)
    assert feats.applies(first) and feats.applies(second)
    cached = [train_run(cfg, data, features=feats.FeatureCache(), **QUIET) for cfg in (first, second)]
    [entry] = entries(cache_dir)  # one entry for both heads of the grid
    stored = (entry / feats.FILE).stat().st_mtime_ns
    again = train_run(first, data, features=feats.FeatureCache(), **QUIET)
    assert (entry / feats.FILE).stat().st_mtime_ns == stored  # read, not computed again
    assert [r.val_loss for r in again.history] == [r.val_loss for r in cached[0].history]

    monkeypatch.setenv(FEATURES, "0")  # the slow way: every batch through the frozen body
    assert not feats.applies(first)
    slow = [train_run(cfg, data, **QUIET) for cfg in (first, second)]
    for fast, through in zip(cached, slow):
        assert fast.best_epoch == through.best_epoch
        assert [r.val_loss for r in fast.history] == pytest.approx([r.val_loss for r in through.history], rel=1e-4)
        body = {k: v for k, v in fast.model.state_dict().items() if not k.startswith("head.")}
        assert all(torch.equal(v, through.model.state_dict()[k]) for k, v in body.items())  # the body never moved
    best = min(range(2), key=lambda i: cached[i].best.val_loss)
    assert best == min(range(2), key=lambda i: slow[i].best.val_loss)  # the same selection


def test_the_key_names_the_weights_the_data_the_device_and_the_code(weights: Path) -> None:
    cfg = expand(params(), weights_dir=weights)[0]
    base = feats.features_key(cfg, "fp1", "cpu", code="c1")
    spec = dict(tvs.spec_of(cfg.layers))
    other_weights = cfg.model_copy(update={"layers": ({**spec, "weights_sha256": "0" * 64},)})
    variants = [feats.features_key(other_weights, "fp1", "cpu", code="c1"),
                feats.features_key(cfg, "fp2", "cpu", code="c1"),
                feats.features_key(cfg, "fp1", "cuda:0", code="c1"),
                feats.features_key(cfg, "fp1", "cpu", code="c2")]
    assert base not in variants and len(set(variants)) == 4
    assert feats.features_key(cfg, "fp1", "cpu") == feats.features_key(cfg, "fp1", "cpu",
                                                                        code=code_identity(feats.CODE_ENTRY))
    # a head's own settings are not part of it: every head of a grid shares the entry
    head2 = expand(params(), weights_dir=weights)[1]
    assert feats.features_key(head2, "fp1", "cpu", code="c1") == base


@pytest.mark.parametrize("changes", [{"finetune": "gradual"}, {"finetune": "full"}, {"augment": "flip"},
                                     {"bn_frozen": False}, {"model": "small_bn", "finetune": "full"},
                                     {"pretrained": {"weights": "none"}}])
def test_features_are_used_only_when_the_body_is_a_fixed_function_of_fixed_inputs(
        changes: dict[str, Any], weights: Path) -> None:
    assert not any(feats.applies(cfg) for cfg in expand(params(**changes), weights_dir=weights))


def test_a_damaged_entry_is_computed_again(weights: Path, tiny_prepared: Path, tmp_path: Path) -> None:
    data = TrainData.load(tiny_prepared)
    cfg = expand(params(), weights_dir=weights)[0]
    torch.manual_seed(0)
    model = build_model(cfg.layers, data.image_shape, data.num_classes, weights_dir=weights)
    mean, std = tvs.run_normalization(cfg.layers, data.mean, data.std)
    cache = feats.FeatureCache(tmp_path / "features")
    fresh = cache.get_or_compute(cfg, data, model, mean, std, "cpu")
    assert not fresh.reused and fresh.train.shape == (len(data.train), model.head.in_features)
    assert cache.get_or_compute(cfg, data, model, mean, std, "cpu").reused
    (tmp_path / "features" / fresh.key / feats.FILE).write_bytes(b"\x80\x04 not safetensors")
    redone = cache.get_or_compute(cfg, data, model, mean, std, "cpu")
    assert not redone.reused and torch.equal(redone.train, fresh.train) and torch.equal(redone.val, fresh.val)
