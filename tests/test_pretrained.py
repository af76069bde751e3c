"""Pretrained torchvision models: names, the weights stage's fetch and refusals, fine-tuning, normalization, shipping.

Nothing can be downloaded here, so the weights are made by the tests: a
randomly initialised torchvision state dict saved under the file name
torchvision's cache expects (``$TORCH_HOME/hub/checkpoints/<name from
weights.url>``, so the real look-up path runs), a local file, a URL served on
127.0.0.1, and the bad ones: a wrong SHA-256, another architecture's state
dict, a truncated file and a pickle that would run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from fixtures_raw import Evil, no_proxy, serve  # noqa: F401 - no_proxy is a fixture

from cnnpipe.engine.data import TrainData
from cnnpipe.engine.loop import train_run
from cnnpipe.engine.finetune import body_and_head, frozen_at, param_groups, parameter_counts, set_phase, tracking_fields
from cnnpipe.engine.resume import load_resume_state, state_path
from cnnpipe.pretrained import fetch as pw
from cnnpipe.models import torchvision_spec as tvs
from cnnpipe.models.build import build_model
from cnnpipe.models.torchvision_nets import TorchvisionNet
from cnnpipe.params.load import parse_params
from cnnpipe.params.schema import Params
from cnnpipe.params.values import TrainingValues
from cnnpipe.search.space import expand
from cnnpipe.util.errors import CheckpointError, CnnpipeError, DataError, ParamsError
from cnnpipe.util.hashing import sha256_file

ARCH = "mobilenet_v3_small"  # 1.5M parameters: the smallest torchvision classifier with BatchNorm
NAME = f"{tvs.PREFIX}{ARCH}"
HEAD_KEYS = ("classifier.3.weight", "classifier.3.bias")  # the classifier torchvision's weights end with
QUIET: dict[str, Any] = {"progress": False, "num_threads": 1}

pytestmark = pytest.mark.long(70)


def arch_state(arch: str = ARCH, seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision state dict (what a real download would hold, other values)."""
    torch.manual_seed(seed)
    return torchvision.models.get_model(arch, weights=None).state_dict()


def place(home: Path, arch: str) -> Path:
    """``arch``'s IMAGENET1K_V1 (random values) in ``home``'s hub cache, under torchvision's own file name."""
    url = torchvision.models.get_model_weights(arch)["IMAGENET1K_V1"].url
    target = home / "hub" / "checkpoints" / os.path.basename(url)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(arch_state(arch), target)
    return target


@pytest.fixture(scope="module")
def placed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TORCH_HOME whose hub cache holds IMAGENET1K_V1 of ``ARCH``."""
    return place(tmp_path_factory.mktemp("torch_home"), ARCH)


@pytest.fixture
def torch_home(placed: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(placed.parents[2]))
    return placed


def params_for(**changes: Any) -> Params:
    raw: dict[str, Any] = {"model": NAME, "lr": 0.01, "batch_size": 50, "epochs": 2, "patience": 5,
                           "data": {"dataset": "fashion-mnist"}}
    return parse_params(raw | changes)


def refuses(params: Params, out: Path, error: type[CnnpipeError], *needles: str) -> str:
    """The fetch fails with one line holding every needle, and writes nothing."""
    with pytest.raises(error) as caught:
        pw.fetch_weights(params, out, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    assert not out.exists()
    return message


# --------------------------------------------------------------------------- names and validation


def test_every_torchvision_classifier_name_is_accepted_and_resolves_to_an_explicit_weights_name() -> None:
    small = [arch for arch in torchvision.models.list_models(module=torchvision.models) if tvs.min_size(arch) <= (28, 28)]
    names = [tvs.PREFIX + arch for arch in small if tvs.has_linear_classifier(arch)]
    assert sorted(set(small) - {tvs.arch_of(n) for n in names}) == ["squeezenet1_0", "squeezenet1_1"]  # a conv head
    params = parse_params({"model": ["small_bn", *names], "pretrained": {"weights": "DEFAULT"},
                           "lr": 0.01, "batch_size": 100, "grid": {"max_runs": 200}})
    for name in names:
        spec = tvs.spec_of(params.layers_for(name))
        arch = tvs.arch_of(name)
        assert spec["torchvision"] == arch and spec["in_channels"] == 1
        assert spec["weights"] == torchvision.models.get_model_weights(arch).DEFAULT.name != "DEFAULT"


@pytest.mark.parametrize("changes, needle", [
    ({"model": "torchvision:resnet81"}, "unknown torchvision model 'resnet81', did you mean torchvision:resnet18"),
    ({"model": ["small_bn", "torchvision:mobilenet_v3_smal"]}, "did you mean torchvision:mobilenet_v3_small"),
    ({"model": "torchvision:inception_v3"}, "needs images of at least 75x75 pixels, the data gives 28x28"),
    ({"model": "torchvision:squeezenet1_1"}, "ends in no nn.Linear classifier (its head is a convolution)"),
    ({"model": "small_bn", "finetune": "head"}, "finetune: head needs a torchvision model, but model small_bn"),
    ({"model": ["small_bn", NAME], "finetune": "gradual"}, "finetune: gradual needs a torchvision model"),
    ({"pretrained": {"weights": "IMAGENET1K_V9"}}, "is not a weights name of torchvision:mobilenet_v3_small"),
    ({"pretrained": {"weights": "weights.pth"}}, "pin it with pretrained.sha256"),
    ({"pretrained": {"weights": "https://example.com/w.pth"}}, "pin it with pretrained.sha256"),
    ({"pretrained": {"weights": "s3://bucket/w.pth", "sha256": "0" * 64}}, "unsupported scheme 's3'"),
    ({"model": [NAME, "torchvision:resnet18"], "pretrained": {"weights": "w.pth", "sha256": "0" * 64}},
     "is one state dict, but model lists 2 torchvision models"),
])
def test_bad_torchvision_params_are_one_line(changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(ParamsError) as caught:
        params_for(**changes)
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_show_model_prints_layers_shapes_and_counts(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnpipe.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("model: small_bn\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["show-model", NAME, "--dataset", "cifar10"])
    assert not exit_info.value.code
    out = capsys.readouterr().out
    torch.manual_seed(0)
    reference = torchvision.models.get_model(ARCH, weights=None, num_classes=10)
    total = sum(p.numel() for p in reference.parameters())
    assert f"total parameters: {total:,}" in out
    assert "features (Sequential)        576x1x1" in out and "head (Linear 1024->10)" in out


# --------------------------------------------------------------------------- fetching: the good sources


def test_weights_stage_reads_torchvisions_cache_and_pins_every_run(torch_home: Path, tmp_path: Path) -> None:
    params = params_for(lr=[0.01, 0.001], pretrained={"weights": "DEFAULT"})
    out = tmp_path / "weights"
    manifest = pw.fetch_weights(params, out, progress=False)
    entry = manifest["weights"][ARCH]
    assert entry["weights"] == "IMAGENET1K_V1" and entry["source"].endswith(torch_home.name)
    assert entry["sha256"] == sha256_file(torch_home)
    assert entry["mean"] == [0.485, 0.456, 0.406] and entry["std"] == [0.229, 0.224, 0.225]
    from safetensors.torch import load_file

    stored = load_file(str(out / entry["file"]))
    source = arch_state()
    assert set(stored) == set(source) - set(HEAD_KEYS)  # the old classifier is dropped
    assert all(torch.equal(stored[key], source[key]) for key in stored)

    runs = expand(params, weights_dir=out)
    spec = tvs.spec_of(runs[0].layers)
    assert spec["weights_sha256"] == entry["sha256"] and spec["mean"] == entry["mean"]
    unpinned = expand(params)
    assert {run.run_id for run in runs}.isdisjoint(run.run_id for run in unpinned)
    model = build_model(runs[0].layers, (1, 28, 28), 10, weights_dir=out)
    assert all(torch.equal(model.body.state_dict()[key], source[key]) for key in stored)


def test_a_state_dict_served_on_loopback_or_in_a_file_is_fetched_when_its_pin_matches(
        tmp_path: Path, no_proxy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import save_file

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    www = tmp_path / "www"
    www.mkdir()
    save_file(arch_state(seed=3), str(www / "mine.safetensors"))
    pin = sha256_file(www / "mine.safetensors")
    with contextlib.contextmanager(serve)(www) as server:
        params = params_for(pretrained={"weights": f"{server.url}/mine.safetensors", "sha256": pin})
        entry = pw.fetch_weights(params, tmp_path / "a", progress=False)["weights"][ARCH]
        assert entry["sha256"] == pin and entry["weights"] == "custom"
        assert (tmp_path / "home" / "hub" / "checkpoints" / "mine.safetensors").is_file()  # cached like torchvision's

        wrong = params_for(pretrained={"weights": f"{server.url}/mine.safetensors", "sha256": "0" * 64})
        refuses(wrong, tmp_path / "b", DataError, f"have SHA-256 {pin}, not pretrained.sha256 {'0' * 64}")
    local = params_for(pretrained={"weights": str(www / "mine.safetensors"), "sha256": pin})
    assert pw.fetch_weights(local, tmp_path / "c", progress=False)["weights"][ARCH]["sha256"] == pin


def test_a_cnnpipe_checkpoint_is_a_starting_point_with_its_own_normalization(tmp_path: Path) -> None:
    from cnnpipe.models.checkpoint import save_checkpoint

    spec = {**tvs.layer_spec(ARCH, "IMAGENET1K_V1", 3)[0], "weights_sha256": "a" * 64,
            "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    torch.manual_seed(1)
    model = build_model([spec], (3, 32, 32), 4)
    save_checkpoint(tmp_path / "best", model, {"layers": [spec], "in_shape": [3, 32, 32], "num_classes": 4,
                                               "mean": [0.5] * 3, "std": [0.25] * 3, "model": NAME})
    params = params_for(pretrained={"weights": str(tmp_path / "best")})
    entry = pw.fetch_weights(params, tmp_path / "w", progress=False)["weights"][ARCH]
    assert entry["mean"] == [0.5, 0.5, 0.5] and entry["sha256"] == sha256_file(tmp_path / "best" / "model.safetensors")
    other = params_for(model="torchvision:resnet18", pretrained={"weights": str(tmp_path / "best")})
    refuses(other, tmp_path / "x", CheckpointError, "holds torchvision:mobilenet_v3_small, not torchvision:resnet18")


# --------------------------------------------------------------------------- fetching: one line, nothing written


def test_offline_with_no_file_names_the_weights_the_path_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    for name in ("https_proxy", "HTTPS_PROXY"):  # the network's edge: a proxy that refuses every connection
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    params = params_for(data={"dataset": "fashion-mnist", "download": {"retries": 0, "timeout": 5}})
    expected = tmp_path / "empty" / "hub" / "checkpoints" / os.path.basename(
        torchvision.models.get_model_weights(ARCH)["IMAGENET1K_V1"].url)
    refuses(params, tmp_path / "w", DataError, "torchvision:mobilenet_v3_small weights IMAGENET1K_V1",
            f"not found at {expected}", f"place the file at {expected}")
    assert not expected.exists()


def test_a_download_whose_hash_is_not_its_file_names_is_refused(tmp_path: Path, no_proxy: None) -> None:
    www = tmp_path / "www"
    www.mkdir()
    (www / "net-0123abcd.pth").write_bytes(b"not the weights")
    dest = tmp_path / "cache" / "net-0123abcd.pth"
    dest.parent.mkdir()
    with contextlib.contextmanager(serve)(www) as server, pytest.raises(DataError, match="does not start with"):
        pw.download(f"{server.url}/net-0123abcd.pth", dest, what="w", timeout=5, retries=0, progress=False,
                    hash_prefix="0123abcd")
    assert list(dest.parent.iterdir()) == []


def _bad_file(kind: str, folder: Path) -> Path:
    path = folder / f"{kind}.pth"
    if kind == "other_architecture":
        torch.save(arch_state("squeezenet1_1"), path)
    elif kind == "truncated":
        torch.save(arch_state(), path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "truncated_safetensors":
        from safetensors.torch import save_file

        path = folder / "truncated.safetensors"
        save_file(arch_state(), str(path))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "pickle_that_runs_code":
        path.write_bytes(pickle.dumps(Evil(f"touch {folder / 'pwned'}"), protocol=2))
    elif kind == "torch_file_that_runs_code":
        torch.save({"conv.weight": torch.zeros(1), "payload": Evil(f"touch {folder / 'pwned'}")}, path)
    return path


@pytest.mark.parametrize("kind, error, needle", [
    ("other_architecture", CheckpointError, "do not fit the architecture (missing features.0.0.weight, "),
    ("truncated", CheckpointError, "is truncated or corrupt"),
    ("truncated_safetensors", CheckpointError, "is truncated"),
    ("pickle_that_runs_code", CheckpointError, "is a pickle that would run code"),
    ("torch_file_that_runs_code", CheckpointError, "is a pickle that would run code"),
])
def test_bad_weights_files_are_one_line_and_nothing_is_written(kind: str, error: type[CnnpipeError], needle: str,
                                                               tmp_path: Path) -> None:
    path = _bad_file(kind, tmp_path)
    params = params_for(pretrained={"weights": str(path), "sha256": sha256_file(path)})
    refuses(params, tmp_path / "weights", error, needle, str(path))
    assert not (tmp_path / "pwned").exists()


def test_the_train_side_refuses_weights_that_changed_after_pinning(torch_home: Path, tmp_path: Path) -> None:
    params = params_for()
    out = tmp_path / "weights"
    pw.fetch_weights(params, out, progress=False)
    runs = expand(params, weights_dir=out)
    manifest = json.loads((out / "manifest.json").read_text())
    file = out / manifest["weights"][ARCH]["file"]
    file.write_bytes(file.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(DataError, match="does not match"):
        build_model(runs[0].layers, (1, 28, 28), 10, weights_dir=out)
    with pytest.raises(DataError, match="dvc repro weights"):
        expand(params, weights_dir=tmp_path / "never_fetched")


# --------------------------------------------------------------------------- the network and the strategies


def test_the_body_and_head_compose_to_the_model_and_one_channel_input_gets_imagenet_normalization() -> None:
    spec = {**tvs.layer_spec(ARCH, "IMAGENET1K_V1", 1)[0], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    torch.manual_seed(0)
    model = build_model([spec], (1, 32, 32), 5).eval()
    body, head = body_and_head(model)
    gray = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8)
    mean, std = tvs.run_normalization([spec], [0.3], [0.3])
    assert mean == [pytest.approx(sum(spec["mean"]) / 3)]
    x = (gray.float() / 255 - mean[0]) / std[0]
    with torch.no_grad():
        assert torch.equal(head(body(x)), model(x))
        rgb = gray.expand(-1, 3, -1, -1).float() / 255
        reference = (rgb - torch.tensor(spec["mean"]).view(1, 3, 1, 1)) / torch.tensor(spec["std"]).view(1, 3, 1, 1)
        assert torch.allclose(model.adapter(x), reference, atol=1e-5)


@pytest.mark.parametrize("finetune", ["full", "head", "gradual"])
def test_optimizer_groups_are_the_same_in_every_phase(finetune: str) -> None:
    values = TrainingValues(model=NAME, finetune=finetune, freeze_epochs=2, body_lr_mult=0.1, lr=0.01, weight_decay=0.1)
    torch.manual_seed(0)
    model = build_model(list(tvs.layer_spec(ARCH, "none", 3)), (3, 32, 32), 3)
    groups = param_groups(model, values)
    assert [g["role"] for g in groups] == ["head", "head", "body", "body"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1, 0.0]
    body_lr = {"full": 0.01, "head": 0.01, "gradual": 0.001}[finetune]
    assert [g["lr"] for g in groups] == pytest.approx([0.01, 0.01, body_lr, body_lr])
    assert [frozen_at(values, epoch) for epoch in (1, 2, 3)] == \
        {"full": [False] * 3, "head": [True] * 3, "gradual": [True, True, False]}[finetune]
    model.train()
    assert set_phase(model, values, 1) == frozen_at(values, 1)
    norms = [m for m in model.body.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.training != frozen_at(values, 1) for m in norms)  # bn_frozen: a frozen body's BN stats stay
    assert all(p.requires_grad != frozen_at(values, 1) for p in model.body.parameters())
    model.train()
    set_phase(model, values.model_copy(update={"bn_frozen": False}), 1)
    assert all(m.training for m in norms)
    counts = parameter_counts(model, values)
    assert counts["params_total"] == sum(p.numel() for p in model.parameters())
    assert counts.get("params_trainable_frozen") == (3075 if finetune != "full" else None)  # 1024*3 + 3


@pytest.fixture(scope="module")
def fetched(placed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("weights") / "weights"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(placed.parents[2]))
        pw.fetch_weights(params_for(), folder, progress=False)
    return folder


def _gradual(fetched: Path, **changes: Any):  # type: ignore[no-untyped-def]
    params = params_for(**({"finetune": "gradual", "freeze_epochs": 1, "body_lr_mult": 0.1, "batch_size": 100} | changes))
    return expand(params, weights_dir=fetched)[0]


@pytest.mark.slow
def test_gradual_trains_the_head_then_everything_reproducibly_and_resumes_across_the_phase_switch(
        fetched: Path, tiny_prepared: Path, tmp_path: Path) -> None:
    data = TrainData.load(tiny_prepared)
    cfg = _gradual(fetched)
    pretrained = build_model(cfg.layers, data.image_shape, data.num_classes, weights_dir=fetched).body.state_dict()
    bodies: dict[int, dict[str, torch.Tensor]] = {}

    def keep(record, model) -> None:  # type: ignore[no-untyped-def]
        bodies[record.epoch] = {k: v.detach().clone() for k, v in model.body.state_dict().items()}

    whole = train_run(cfg, data, on_epoch=keep, resume_dir=tmp_path / "a", **QUIET)
    assert whole.status == "finished" and whole.epochs_run == 2
    # Epoch 1 trained the head only: the body, BatchNorm statistics included (bn_frozen), is the pretrained one.
    assert all(torch.equal(bodies[1][key], pretrained[key]) for key in pretrained)
    assert not all(torch.equal(bodies[2][key], pretrained[key]) for key in pretrained)

    first = train_run(cfg, data, resume_dir=tmp_path / "b", stop_after=1, **QUIET)  # killed after the head phase
    assert first.status == "paused"
    saved = load_resume_state(tmp_path / "b")  # the body trains later: even a head-phase state holds all of it
    assert saved is not None and set(saved["model"]) == set(saved["early"]["best_state"]) == set(whole.model.state_dict())
    rest = train_run(cfg, data, resume_dir=tmp_path / "b", **QUIET)
    assert [r.val_loss for r in rest.history] == [r.val_loss for r in whole.history]
    a, b = whole.model.state_dict(), rest.model.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)  # bitwise: same params + seed, resumed or not


def _bits(state: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """Each tensor's bytes: equal only when bitwise equal (``torch.equal`` takes -0.0 for 0.0)."""
    return {key: value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            for key, value in state.items()}


class _Kill(KeyboardInterrupt):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("through", ["features", "body", "body+ema"])
def test_a_frozen_body_run_state_holds_only_the_head_and_resumes_bitwise(
        through: str, fetched: Path, tiny_prepared: Path, tmp_path: Path) -> None:
    """finetune: head + bn_frozen: each epoch's state leaves the body out (it is the pinned weights) and a run
    killed after epoch 2 ends bitwise like one never stopped (through cached features, or through the body)."""
    from cnnpipe.store.features import FeatureCache

    data = TrainData.load(tiny_prepared)
    cfg = expand(params_for(finetune="head", bn_frozen=True, epochs=3, batch_size=100, schedule="onecycle",
                            optimizer="adam", ema=0.9 if through == "body+ema" else 0.0), weights_dir=fetched)[0]
    extra: dict[str, Any] = {"features": FeatureCache(tmp_path / "features")} if through == "features" else {}
    straight = train_run(cfg, data, **QUIET, **extra)  # no state at all
    pretrained = build_model(cfg.layers, data.image_shape, data.num_classes, weights_dir=fetched).state_dict()
    body = {key for key in pretrained if key.startswith("body.")}

    sizes: list[int] = []

    def kill_after_second(record, model) -> None:  # type: ignore[no-untyped-def]
        sizes.append(state_path(tmp_path / "state").stat().st_size)
        if record.epoch == 2:
            saved = load_resume_state(tmp_path / "state")
            assert saved is not None and set(saved["model"]) == {"head.weight", "head.bias"}
            best = set(saved["early"]["best_state"])
            if through == "body+ema":  # the averaged copy is kept whole (and early stopping copies it whole)
                assert best == set(pretrained) and set(saved["ema"]) >= {f"module.{k}" for k in pretrained}
            else:
                assert best == {"head.weight", "head.bias"} and saved["ema"] is None
            raise _Kill

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, data, resume_dir=tmp_path / "state", on_epoch=kill_after_second, **QUIET, **extra)
    if through != "body+ema":  # the body's 1.5M parameters (6 MB a copy) are not in it
        assert max(sizes) < 200_000, sizes
    resumed = train_run(cfg, data, resume_dir=tmp_path / "state", **QUIET, **extra)
    assert resumed.epochs_run == 3 and [r.epoch for r in resumed.history] == [1, 2, 3]
    def metrics(history):  # type: ignore[no-untyped-def]
        return [(r.train_loss, r.train_top1, r.val_loss, r.val_top1, r.val_top5, r.lr) for r in history]

    assert metrics(resumed.history) == metrics(straight.history)
    assert resumed.best_epoch == straight.best_epoch and resumed.stop_reason == straight.stop_reason
    assert _bits(resumed.model.state_dict()) == _bits(straight.model.state_dict())
    kept = _bits({key: resumed.model.state_dict()[key] for key in body})
    if through != "body+ema":  # without EMA the returned body is the pinned one, bit for bit
        assert kept == _bits({key: pretrained[key] for key in body})


@pytest.mark.slow
def test_layer_histograms_of_a_head_run_reuse_the_frozen_bodys_and_equal_fresh_ones(
        fetched: Path, tiny_prepared: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cnnpipe.reports import layer_histograms as lh

    data = TrainData.load(tiny_prepared)
    cfg = expand(params_for(finetune="head", bn_frozen=True, epochs=3, batch_size=100), weights_dir=fetched)[0]
    computed: list[int] = []
    histogram = lh._histogram
    monkeypatch.setattr(lh, "_histogram", lambda t, bins: computed.append(t.numel()) or histogram(t, bins))
    last = lh.LastSnapshot()
    per_epoch: list[int] = []

    def compare(record, model) -> None:  # type: ignore[no-untyped-def]
        computed.clear()
        last.update(model, record.epoch)
        per_epoch.append(len(computed))
        fresh = lh.snapshot(model)
        assert [layer.name for layer in last.layers] == [layer.name for layer in fresh]
        for kept, new in zip(last.layers, fresh):
            for a, b in ((kept.weight, new.weight), (kept.grad, new.grad)):
                assert (a is None) == (b is None)
                if a is not None:
                    assert a.edges.tobytes() == b.edges.tobytes() and a.counts.tobytes() == b.counts.tobytes()
                    assert repr(a.norm) == repr(b.norm) and a.nonfinite == b.nonfinite

    train_run(cfg, data, on_epoch=compare, **QUIET)
    shown = len(last.layers)
    assert shown == lh.MAX_LAYERS and last.layers[-1].name == "head.weight" and last.layers[-1].grad is not None
    # epoch 1: every weight; then only the head's weight and gradient (the body's never change, have no gradient)
    assert per_epoch == [shown + 1, 2, 2]


@pytest.mark.parametrize("finetune", ["full", "head", "gradual"])
def test_parameter_counts_for_mlflow_are_built_on_the_meta_device_once_per_architecture(
        finetune: str, fetched: Path) -> None:
    from cnnpipe.engine import finetune as ft

    runs = expand(params_for(finetune=finetune, lr=[0.1, 0.01], weight_decay=[0.0, 0.1]), weights_dir=fetched)
    ft._counts.cache_clear()
    fields = [tracking_fields(cfg, (1, 28, 28), 10)[0] for cfg in runs]
    assert ft._counts.cache_info().misses == 1 and ft._counts.cache_info().hits == len(runs) - 1
    torch.manual_seed(0)
    built = build_model(runs[0].layers, (1, 28, 28), 10, weights_dir=fetched)  # real weights, as before
    expected = {"pretrained_weights": "IMAGENET1K_V1", **parameter_counts(built, runs[0].values)}
    assert all(f == expected for f in fields)
    assert expected["params_total"] == sum(p.numel() for p in built.parameters())


def test_the_weights_file_is_hashed_once_per_process_until_it_changes(
        fetched: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from cnnpipe.models import pinned_weights

    folder = tmp_path / "weights"
    shutil.copytree(fetched, folder)
    runs = expand(params_for(), weights_dir=folder)
    file = folder / json.loads((folder / "manifest.json").read_text())["weights"][ARCH]["file"]
    hashed: list[Path] = []
    check = pinned_weights.check_weights_file
    monkeypatch.setattr(pinned_weights, "check_weights_file", lambda path, sha: hashed.append(path) or check(path, sha))
    build_model(runs[0].layers, (1, 28, 28), 10, weights_dir=folder)
    build_model(runs[0].layers, (1, 28, 28), 10, weights_dir=folder)
    assert len(hashed) == 2  # just written (copied): checked every time, a file time may not have ticked yet
    old = time.time() - 3600
    os.utime(file, (old, old))
    monkeypatch.setattr(pinned_weights, "_SETTLED_NS", 0)  # ctime (set by utime itself) is "now": let it count
    build_model(runs[0].layers, (1, 28, 28), 10, weights_dir=folder)
    build_model(runs[0].layers, (1, 28, 28), 10, weights_dir=folder)
    assert len(hashed) == 3  # settled: checked once
    stat = file.stat()
    file.write_bytes(file.read_bytes()[:-8] + b"\0" * 8)  # same size, and the old times put back
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(DataError, match="does not match"):
        build_model(runs[0].layers, (1, 28, 28), 10, weights_dir=folder)  # ctime moved: checked again


@pytest.mark.slow
def test_a_fine_tuned_model_ships_export_and_pyfunc_with_the_weights_normalization(
        tiny_prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from cnnpipe.models.checkpoint import load_checkpoint, save_checkpoint
    from cnnpipe.serving.publish import checkpoint_sidecar
    from cnnpipe.search.selection import RunRecord
    from cnnpipe.serving.export import export_checkpoint
    from cnnpipe.serving.mlflow_model import save_pyfunc
    from cnnpipe.tracking.runs import NullTracker

    # resnet18: its ONNX export traces several times faster than mobilenet_v3_small's
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    place(tmp_path / "home", "resnet18")
    params = params_for(model="torchvision:resnet18", finetune="head", epochs=1, batch_size=100)
    pw.fetch_weights(params, tmp_path / "weights", progress=False)
    cfg = expand(params, weights_dir=tmp_path / "weights")[0]
    data = TrainData.load(tiny_prepared)
    result = train_run(cfg, data, **QUIET)
    sidecar = checkpoint_sidecar(RunRecord(1, cfg, result), data, NullTracker())
    assert sidecar["mean"] == [pytest.approx((0.485 + 0.456 + 0.406) / 3)]  # the weights', not the data's
    save_checkpoint(tmp_path / "best", result.model, sidecar)
    checkpoint = load_checkpoint(tmp_path / "best")  # rebuilt from the sidecar alone
    assert isinstance(checkpoint.model, TorchvisionNet)

    images = data.val.images[:8].numpy()
    exported = export_checkpoint(checkpoint, images, tmp_path / "exports")
    assert [e.format for e in exported] == ["onnx", "torchscript"]
    assert all(e.max_abs_diff <= 1e-4 and e.top1_same == 8 for e in exported)

    import mlflow.pyfunc

    save_pyfunc(tmp_path / "best", tmp_path / "pyfunc", prepared_dir=tiny_prepared)
    frame = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc")).predict(images)
    from cnnpipe.engine.inference import evaluate_logits

    logits = evaluate_logits(result.model, data.val.images[:8], mean=sidecar["mean"], std=sidecar["std"])
    assert list(frame["label"]) == [data.classes[i] for i in logits.argmax(1).tolist()]
    assert np.allclose(frame[list(data.classes)].to_numpy(), logits.softmax(1).numpy(), atol=1e-5)


def test_mlflow_fields_name_the_weights_and_count_parameters_per_phase(fetched: Path) -> None:
    cfg = _gradual(fetched)
    params, tags = tracking_fields(cfg, (1, 28, 28), 10)
    assert params["pretrained_weights"] == "IMAGENET1K_V1"
    assert params["params_trainable_frozen"] == 1024 * 10 + 10 < params["params_trainable"] == params["params_total"]
    manifest = json.loads((fetched / "manifest.json").read_text())["weights"][ARCH]
    assert tags == {"pretrained.sha256": manifest["sha256"], "pretrained.source": manifest["source"]}
    assert tracking_fields(expand(parse_params({"model": "small_bn"}))[0], (1, 28, 28), 10) == ({}, {})


# --------------------------------------------------------------------------- the real pipeline


@pytest.mark.slow
def test_dvc_repro_fine_tunes_a_torchvision_model_from_placed_weights_then_evaluates_and_registers(
        placed: Path, tmp_path: Path, no_proxy: None) -> None:
    import yaml
    from fixtures_raw import make_idx_raw
    from project_builder import BIN, pipeline_project, run

    registered = "cnnpipe-classifier"
    fixture = make_idx_raw(tmp_path / "www", n_train=200, n_test=40)
    env = {"TORCH_HOME": str(placed.parents[2])}
    with contextlib.contextmanager(serve)(fixture.folder) as server:
        project = pipeline_project(tmp_path / "project", server.url, fixture.checksums, params={
            "model": NAME, "finetune": "gradual", "freeze_epochs": 1, "epochs": 2, "lr": 0.01, "batch_size": 50,
            "mlflow": {"enabled": True, "tracking_uri": None, "experiment": "cnnpipe",
                       "registered_model": registered, "log_layer_stats": False}})
        # Up to evaluate: every assertion below reads weights, train or evaluate (plots, downstream, would only
        # draw figures, and a stage process costs seconds).
        repro = run([str(BIN / "dvc"), "repro", "evaluate"], project, timeout=600, env=env)
    assert repro.returncode == 0, repro.stdout[-3000:] + repro.stderr[-3000:]
    for stage in ("weights", "train", "evaluate"):
        assert f"Running stage '{stage}'" in repro.stdout

    manifest = json.loads((project / "data" / "weights" / "manifest.json").read_text())["weights"][ARCH]
    assert manifest["sha256"] == sha256_file(placed)
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert any(out["path"] == "data/weights" for out in lock["stages"]["weights"]["outs"])
    assert any(dep["path"] == "data/weights" for dep in lock["stages"]["train"]["deps"])

    sidecar = json.loads((project / "models" / "best" / "model.json").read_text())
    spec = tvs.spec_of(sidecar["layers"])
    assert spec["weights_sha256"] == manifest["sha256"] and spec["weights"] == "IMAGENET1K_V1"
    assert sidecar["mean"] == [pytest.approx(sum(manifest["mean"]) / 3)]
    assert sidecar["params"]["finetune"] == "gradual"
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["test_images"] == 40 and 0.0 <= metrics["test_top1"] <= 1.0

    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    child = client.get_run(metrics["mlflow_run_id"])
    assert child.data.params["finetune"] == "gradual" and child.data.params["pretrained_weights"] == "IMAGENET1K_V1"
    assert int(child.data.params["params_trainable_frozen"]) == 1024 * 10 + 10
    assert child.data.tags["pretrained.sha256"] == manifest["sha256"]
    assert [int(m.step) for m in client.get_metric_history(child.info.run_id, "val_loss")] == [1, 2]
    version = client.get_model_version_by_alias(registered, "champion")
    assert version.run_id == metrics["mlflow_run_id"]

    # Continue from your own model: the champion as the next project's starting weights.
    again = params_for(pretrained={"weights": f"models:/{registered}@champion"},
                       mlflow={"tracking_uri": uri, "registered_model": registered})
    entry = pw.fetch_weights(again, tmp_path / "from_champion", progress=False)["weights"][ARCH]
    assert entry["sha256"] == sidecar["weights_sha256"] and entry["mean"] == manifest["mean"]
    assert entry["source"] == f"models:/{registered}@champion"
