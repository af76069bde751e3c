"""Checkpoints: safetensors + JSON sidecar; every way a foreign file is refused."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from cnnpipe.models.checkpoint import FORMAT, SIDECAR_FILE, WEIGHTS_FILE, load_checkpoint, read_sidecar, save_checkpoint
from cnnpipe.util.errors import CheckpointError
from cnnpipe.util.hashing import sha256_file
from cnnpipe.models.build import build_model

LAYERS = [{"conv": 6, "kernel": 3, "padding": 1, "bias": False}, "batchnorm", "relu", {"maxpool": 2},
          {"residual": 8, "stride": 2}, "flatten", {"dropout": 0.1}, {"linear": 16}, "batchnorm", "relu", "linear"]
SHAPE = (1, 12, 12)


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(LAYERS, SHAPE, 4)
    model.train()
    with torch.no_grad():  # move BatchNorm running stats off their defaults
        model(torch.randn(16, *SHAPE))
    return model.eval()


def sidecar(**extra: Any) -> dict[str, Any]:
    base = {
        "model": "tiny", "layers": LAYERS, "in_shape": list(SHAPE), "num_classes": 4,
        "classes": ["a", "b", "c", "d"], "dataset": "fashion-mnist", "data_fingerprint": "f" * 16,
        "mean": [0.3], "std": [0.3], "params": {"lr": 0.01}, "run_id": "0123456789", "run_name": "lr=0.01",
        "best_epoch": 2, "metrics": {"val_loss": 0.5, "val_top1": 0.8, "val_top5": 1.0},
        "mlflow_run_id": None, "mlflow_parent_run_id": None, "mlflow_experiment_id": None,
    }
    base.update(extra)
    return base


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    folder = tmp_path / "best"
    save_checkpoint(folder, make_model(), sidecar())
    return folder


def rewrite_sidecar(folder: Path, **changes: Any) -> None:
    meta = json.loads((folder / SIDECAR_FILE).read_text())
    meta.update(changes)
    (folder / SIDECAR_FILE).write_text(json.dumps(meta))


def test_round_trip_gives_identical_outputs(ckpt: Path) -> None:
    loaded = load_checkpoint(ckpt)
    assert sorted(os.listdir(ckpt)) == [SIDECAR_FILE, WEIGHTS_FILE]
    meta = loaded.sidecar
    assert meta["format"] == FORMAT and meta["weights_sha256"] == sha256_file(ckpt / WEIGHTS_FILE)
    assert meta["cnnpipe_version"] and meta["created"] and meta["run_id"] == "0123456789"
    assert loaded.classes == ["a", "b", "c", "d"] and not loaded.model.training
    x = torch.randn(5, *SHAPE)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), make_model()(x))


def test_channels_last_model_saves(tmp_path: Path) -> None:
    model = make_model().to(memory_format=torch.channels_last)
    save_checkpoint(tmp_path / "c", model, sidecar())
    x = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(load_checkpoint(tmp_path / "c").model(x), make_model()(x), atol=1e-6)


def test_save_replaces_the_whole_folder(ckpt: Path) -> None:
    (ckpt / "stale.txt").write_text("old")
    save_checkpoint(ckpt, make_model(), sidecar(run_id="abcdefabcd"))
    assert not (ckpt / "stale.txt").exists() and read_sidecar(ckpt)["run_id"] == "abcdefabcd"
    assert [p.name for p in ckpt.parent.iterdir()] == ["best"]  # no temp folders left behind


class Payload:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("kind", ["pickle", "torch-zip"])
def test_planted_pickle_is_refused_without_running_it(ckpt: Path, tmp_path: Path, kind: str) -> None:
    marker = tmp_path / "pwned"
    weights = ckpt / WEIGHTS_FILE
    if kind == "pickle":
        weights.write_bytes(pickle.dumps({"0.weight": Payload(marker)}, protocol=4))
    else:
        torch.save({"0.weight": Payload(marker)}, weights)
    rewrite_sidecar(ckpt, weights_sha256=sha256_file(weights))  # an attacker can fix the hash too
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(ckpt)
    message = str(info.value)
    assert str(weights) in message and "never unpickles" in message and "\n" not in message
    assert ("pickle" if kind == "pickle" else "zip") in message
    assert not marker.exists()


def test_truncated_weights_are_refused(ckpt: Path) -> None:
    weights = ckpt / WEIGHTS_FILE
    data = weights.read_bytes()
    for cut in (len(data) - 100, 40, 5):
        weights.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated") as info:
            load_checkpoint(ckpt)
        assert str(weights) in str(info.value) and "re-run the train stage" in str(info.value)


def test_modified_weights_fail_the_hash(ckpt: Path) -> None:
    weights = ckpt / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match weights_sha256"):
        load_checkpoint(ckpt)


def test_garbage_weights_are_not_safetensors(ckpt: Path) -> None:
    (ckpt / WEIGHTS_FILE).write_bytes(b"hello world, this is not a tensor file at all")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(ckpt)


def test_unknown_layer_type_is_refused(ckpt: Path) -> None:
    rewrite_sidecar(ckpt, layers=[{"transformer": 8}, "flatten", "linear"])
    with pytest.raises(CheckpointError, match=r"model.json: cannot rebuild the model .*unknown layer type 'transformer'"):
        load_checkpoint(ckpt)


def test_shape_mismatch_and_missing_keys_are_refused(ckpt: Path) -> None:
    wider = [dict(LAYERS[0], conv=7), *LAYERS[1:]]
    rewrite_sidecar(ckpt, layers=wider)
    with pytest.raises(CheckpointError, match=r"does not fit the model in model.json \(0.weight has shape \(6, 1, 3, 3\), the network needs \(7, 1, 3, 3\)\)"):
        load_checkpoint(ckpt)
    rewrite_sidecar(ckpt, layers=[l for l in LAYERS if l != "batchnorm"])
    with pytest.raises(CheckpointError, match=r"does not fit the model in model.json \(missing .* and \d+ more; unexpected .* and \d+ more\)"):
        load_checkpoint(ckpt)


def test_bad_sidecars_are_refused(ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")
    rewrite_sidecar(ckpt, format="someone-else/3")
    with pytest.raises(CheckpointError, match="has format 'someone-else/3'"):
        load_checkpoint(ckpt)
    (ckpt / SIDECAR_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ckpt)
    (ckpt / SIDECAR_FILE).unlink()
    with pytest.raises(CheckpointError, match="model.json is missing"):
        load_checkpoint(ckpt)


def test_missing_weights_and_fields(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    save_checkpoint(folder, make_model(), sidecar())
    meta = json.loads((folder / SIDECAR_FILE).read_text())
    del meta["in_shape"]
    (folder / SIDECAR_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="lacks in_shape"):
        load_checkpoint(folder)
    save_checkpoint(folder, make_model(), sidecar())
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        load_checkpoint(folder)
