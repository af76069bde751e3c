"""The training engine on tiny synthetic data (CPU, a few epochs of 600 images)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from cnnpipe.engine.data import TrainData
from cnnpipe.engine.inference import evaluate_logits
from cnnpipe.engine.loop import train_run
from cnnpipe.engine.records import EpochRecord
from cnnpipe.engine.augment import augment, random_crop, random_flip
from cnnpipe.engine.early_stopping import EarlyStopping
from cnnpipe.engine.optim import build_optimizer, build_scheduler
from cnnpipe.models.build import build_model
from cnnpipe.models.presets import PRESETS
from cnnpipe.params.run_config import RunConfig
from cnnpipe.params.values import TrainingValues

# Small but exercises everything the resume state must carry: BatchNorm
# buffers, dropout (global RNG), augmentation (generator), a schedule.
TINY = (
    {"conv": 8, "kernel": 3, "padding": 1, "bias": False},
    "batchnorm",
    "relu",
    {"maxpool": 4},
    "flatten",
    {"dropout": 0.2},
    "linear",
)


# One thread: tiny models gain nothing from more, and test machines are shared.
QUIET: dict[str, Any] = {"progress": False, "num_threads": 1}


def make_cfg(layers: tuple[Any, ...] = TINY, **values: Any) -> RunConfig:
    base: dict[str, Any] = {"model": "tiny", "epochs": 2, "batch_size": 64, "lr": 0.01, "augment": "none", "seed": 7}
    base.update(values)
    return RunConfig(values=TrainingValues(**base), layers=tuple(layers), dataset="fashion-mnist")


@pytest.fixture
def data(prepared_dir: Path) -> TrainData:
    return TrainData.load(prepared_dir)


def metrics_of(history: list[EpochRecord]) -> list[tuple[float, ...]]:
    """Everything but the wall-clock columns."""
    return [(r.epoch, r.train_loss, r.train_top1, r.val_loss, r.val_top1, r.val_top5, r.lr) for r in history]


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


# --------------------------------------------------------------------------- data


def test_train_data_load(data: TrainData) -> None:
    assert data.image_shape == (1, 28, 28) and data.num_classes == 10
    assert data.train.images.dtype == torch.uint8 and len(data.train) == 600 and len(data.val) == 100
    assert data.test is not None and len(data.test) == 200
    assert len(data.mean) == 1 and 0 < data.std[0] < 1 and len(data.fingerprint) == 16


# --------------------------------------------------------------------------- training


def test_loss_falls_and_records_are_complete(data: TrainData) -> None:
    result = train_run(make_cfg(epochs=3, layers=tuple(PRESETS["fashion_tutorial"]), lr=0.003), data, **QUIET)
    assert result.status == "finished" and result.stop_reason == "max_epochs"
    assert result.epochs_run == 3 and [r.epoch for r in result.history] == [1, 2, 3]
    first, last = result.history[0], result.history[-1]
    assert last.train_loss < first.train_loss and last.val_loss < first.val_loss
    assert last.val_top1 > 0.5 and last.val_top5 >= last.val_top1
    assert all(r.epoch_seconds > 0 and r.images_per_s > 0 and r.lr == pytest.approx(0.003) for r in result.history)
    assert result.best_epoch is not None and result.best is result.history[result.best_epoch - 1]
    assert result.model is not None and not result.model.training
    assert next(result.model.parameters()).device.type == "cpu" and result.device == "cpu"
    assert result.images_per_s > 0 and result.seconds > 0 and result.run_id == make_cfg(epochs=3, layers=tuple(PRESETS["fashion_tutorial"]), lr=0.003).run_id


def test_same_config_twice_is_bitwise_identical(data: TrainData) -> None:
    cfg = make_cfg(augment="crop_flip", schedule="onecycle", optimizer="adamw", weight_decay=0.01, label_smoothing=0.1)
    a = train_run(cfg, data, **QUIET)
    b = train_run(cfg, data, **QUIET)
    assert metrics_of(a.history) == metrics_of(b.history)
    assert same_weights(a.model.state_dict(), b.model.state_dict())
    c = train_run(make_cfg(augment="crop_flip", schedule="onecycle", optimizer="adamw", weight_decay=0.01,
                           label_smoothing=0.1, seed=8), data, **QUIET)
    assert metrics_of(c.history) != metrics_of(a.history)


def test_global_rng_and_threads_untouched(data: TrainData) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    train_run(make_cfg(epochs=1), data, progress=False, num_threads=1)
    assert torch.equal(torch.rand(3), expected) and torch.get_num_threads() == threads


def test_early_stopping_stops_and_restores_best_weights(data: TrainData) -> None:
    # min_delta 10 means only the first epoch (vs +inf) counts as an improvement.
    cfg = make_cfg(epochs=5, patience=1, min_delta=10.0, lr=0.01)
    snapshots: dict[int, dict[str, torch.Tensor]] = {}

    def keep(record: EpochRecord, model: torch.nn.Module) -> None:
        snapshots[record.epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    result = train_run(cfg, data, on_epoch=keep, **QUIET)
    assert result.status == "finished" and result.stop_reason == "early_stopping"
    assert result.epochs_run == 2 and result.best_epoch == 1 and result.best.epoch == 1
    assert same_weights(result.model.state_dict(), snapshots[1])
    assert not same_weights(result.model.state_dict(), snapshots[2])


def test_early_stopping_on_val_top1_higher_is_better() -> None:
    stopper = EarlyStopping("val_top1", patience=2, min_delta=0.0)
    model = torch.nn.Linear(2, 2)
    assert stopper.update(0.5, 1, model) and not stopper.update(0.5, 2, model)
    assert not stopper.should_stop
    assert not stopper.update(0.4, 3, model) and stopper.should_stop and stopper.best_epoch == 1


def test_diverging_lr_is_a_status_not_an_exception(data: TrainData) -> None:
    cfg = make_cfg(layers=tuple(PRESETS["fashion_tutorial"]), optimizer="sgd", lr=1e12, momentum=0.0, epochs=3)
    result = train_run(cfg, data, **QUIET)
    assert result.status == "diverged"
    assert result.stop_reason.startswith("diverged: loss is ") and " at epoch 1 batch " in result.stop_reason
    assert result.history == [] and result.model is None and result.best_epoch is None


def test_layer_stats_named_by_module_path(data: TrainData) -> None:
    layers = (TINY[0], "batchnorm", "relu", {"residual": 8, "stride": 2}, {"maxpool": 2}, "flatten", "linear")
    result = train_run(make_cfg(epochs=1, layers=layers), data, **QUIET, layer_stats=True)
    stats = result.history[0].layer_stats
    for name in ("0", "1", "3.conv1", "3.bn2", "6"):
        assert stats[f"weight_norm/{name}"] > 0 and stats[f"grad_norm/{name}"] > 0
    assert all(math.isfinite(v) for v in stats.values())
    assert train_run(make_cfg(epochs=1), data, **QUIET).history[0].layer_stats == {}


class _ReferenceLayerStats:
    """``LayerStats`` as it was before its memo: a zero tensor per gradient-less parameter, every norm every epoch."""

    def __init__(self, model: torch.nn.Module) -> None:
        from cnnpipe.engine.layer_stats import _stat_modules

        self.modules = _stat_modules(model)
        self.params = [p for _, ps in self.modules for p in ps]
        self.owner = torch.tensor([i for i, (_, ps) in enumerate(self.modules) for _ in ps], dtype=torch.long)
        self.grad_sum = torch.zeros(len(self.modules))
        self.steps = 0

    def _module_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)])
        return torch.zeros(len(self.modules)).index_add_(0, self.owner, norms.square()).sqrt()

    def after_backward(self) -> None:
        self.grad_sum += self._module_norms([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        self.steps += 1

    def collect(self) -> dict[str, float]:
        with torch.no_grad():
            weights = self._module_norms([p.detach() for p in self.params]).tolist()
        grads = (self.grad_sum / max(1, self.steps)).tolist()
        self.grad_sum.zero_()
        self.steps = 0
        return {k: v for (name, _), w, g in zip(self.modules, weights, grads)
                for k, v in ((f"weight_norm/{name}", float(w)), (f"grad_norm/{name}", float(g)))}


def test_layer_stats_skip_frozen_gradients_and_unchanged_weights_and_log_the_same_values(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Frozen parameters (no gradient) and unchanged weights cost nothing, and every logged value keeps its bits."""
    from cnnpipe.engine.layer_stats import LayerStats

    layers = (TINY[0], "batchnorm", "relu", {"residual": 8, "stride": 2}, {"maxpool": 2}, "flatten", "linear")
    torch.manual_seed(0)
    model = build_model(list(layers), (1, 28, 28), 10)
    new, old = LayerStats(model, "cpu"), _ReferenceLayerStats(model)
    frozen = [p for name, p in model.named_parameters() if name.startswith(("0.", "3.conv1"))]
    for p in frozen:  # frozen after the stats were made, as engine.finetune.set_phase does at each epoch
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)  # as the engine
    zeros_like = torch.zeros_like
    made: list[torch.Size] = []
    monkeypatch.setattr(torch, "zeros_like", lambda t, *a, **k: made.append(t.shape) or zeros_like(t, *a, **k))
    norms_of: list[int] = []
    foreach_norm = torch._foreach_norm
    monkeypatch.setattr(torch, "_foreach_norm", lambda ts, *a, **k: norms_of.append(len(ts)) or foreach_norm(ts, *a, **k))
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for epoch in range(3):
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            made.clear()
            new.after_backward()
            assert made == []  # no zero tensors for the frozen ones...
            old.after_backward()
            assert len(made) == len(frozen)  # ... where the reference builds one each
            optimizer.step()
        norms_of.clear()
        got = new.collect()
        weight_norms_computed = norms_of[0]
        expected = old.collect()
        assert {k: repr(v) for k, v in got.items()} == {k: repr(v) for k, v in expected.items()}  # bit for bit
        assert got["grad_norm/0"] == 0.0 and got["grad_norm/3.conv1"] == 0.0 and got["grad_norm/6"] > 0
        trained = len(new.params) - len(frozen)
        assert weight_norms_computed == (len(new.params) if epoch == 0 else trained)  # unchanged: not again


def test_early_stopping_with_fixed_keys_copies_and_restores_only_the_others() -> None:
    from cnnpipe.engine.early_stopping import load_partial

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    fixed = frozenset({"0.weight", "0.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"})
    stopper = EarlyStopping("val_loss", patience=2, fixed=fixed)
    assert stopper.update(1.0, 1, model)
    assert set(stopper.best_state) == set(model.state_dict()) - fixed
    best = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model[1:].parameters():
            p.add_(1.0)
    stopper.restore(model)
    assert same_weights(model.state_dict(), best)
    saved = stopper.state_dict()
    again = EarlyStopping("val_loss", patience=2, fixed=fixed)
    again.load_state_dict(saved, "cpu")
    assert set(again.best_state) == set(stopper.best_state)
    with pytest.raises(ValueError, match="missing 2.weight"):
        load_partial(model, {k: v for k, v in stopper.best_state.items() if k != "2.weight"}, fixed, "weights")
    with pytest.raises(ValueError, match="unexpected extra"):
        load_partial(model, {**stopper.best_state, "extra": torch.zeros(1)}, fixed, "weights")


@pytest.mark.parametrize("shuffle", [True, False])
def test_shuffle_flag(data: TrainData, shuffle: bool) -> None:
    a = train_run(make_cfg(epochs=1, shuffle=shuffle), data, **QUIET)
    b = train_run(make_cfg(epochs=1, shuffle=shuffle, seed=8), data, **QUIET)
    # without shuffling, the seed still sets init and dropout, so metrics differ either way
    assert a.history[0].train_loss != b.history[0].train_loss


# --------------------------------------------------------------------------- schedules


def _lrs(schedule: str, steps: int = 20, lr: float = 0.1) -> list[float]:
    values = TrainingValues(lr=lr, schedule=schedule, optimizer="sgd")
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model, values)
    scheduler = build_scheduler(optimizer, values, steps)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return out


def test_schedules_change_lr_as_expected() -> None:
    assert _lrs("none") == [0.1] * 20
    cosine = _lrs("cosine")
    assert cosine[0] == pytest.approx(0.1) and all(a >= b for a, b in zip(cosine, cosine[1:])) and cosine[-1] < 0.01
    onecycle = _lrs("onecycle")
    peak = onecycle.index(max(onecycle))
    assert onecycle[0] == pytest.approx(0.1 / 25) and max(onecycle) == pytest.approx(0.1, rel=1e-3)
    assert 0 < peak < 19 and onecycle[-1] < 0.01


def test_schedule_runs_per_step_in_history(data: TrainData) -> None:
    result = train_run(make_cfg(epochs=3, schedule="cosine", lr=0.05), data, **QUIET)
    lrs = [r.lr for r in result.history]
    assert lrs[0] < 0.05 and lrs[0] > lrs[1] > lrs[2] >= 0


def test_weight_decay_skips_biases_and_norms() -> None:
    model = build_model(list(TINY), (1, 28, 28), 10)
    optimizer = build_optimizer(model, TrainingValues(optimizer="sgd", weight_decay=0.1, nesterov=True))
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    assert optimizer.defaults["nesterov"] is True


# --------------------------------------------------------------------------- augmentation


def _batch(n: int = 16, c: int = 3, h: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, h), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


@pytest.mark.parametrize("mode", ["none", "crop", "flip", "crop_flip"])
def test_augment_keeps_shape_dtype_and_is_deterministic_per_generator(mode: str) -> None:
    x = _batch()
    a = augment(x, mode, torch.Generator().manual_seed(1))
    b = augment(x, mode, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.uint8 and torch.equal(a, b)
    if mode == "none":
        assert torch.equal(a, x)
    else:
        assert not torch.equal(a, augment(x, mode, torch.Generator().manual_seed(2)))


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    x = _batch(n=32, c=2, h=8)
    out = random_crop(x, 2, torch.Generator().manual_seed(5))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(x.shape[0]):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    assert not torch.equal(out, x)  # 32 images: some offset is not (2, 2)


def test_random_flip_mirrors_some_images_exactly() -> None:
    x = _batch(n=64)
    out = random_flip(x, torch.Generator().manual_seed(3))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_unknown_augment_is_refused() -> None:
    with pytest.raises(ValueError):
        augment(_batch(), "rotate", torch.Generator())


# --------------------------------------------------------------------------- evaluation


def test_evaluate_logits_shape_dtype_mode(data: TrainData) -> None:
    torch.manual_seed(0)
    model = build_model(list(TINY), (1, 28, 28), 10).train()
    logits = evaluate_logits(model, data.val.images, mean=data.mean, std=data.std, batch_size=33)
    assert logits.shape == (100, 10) and logits.dtype == torch.float32 and model.training
    whole = evaluate_logits(model, data.val.images, mean=data.mean, std=data.std, batch_size=1000)
    assert torch.allclose(logits, whole, atol=1e-5)


# --------------------------------------------------------------------------- resume


class Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(data: TrainData, tmp_path: Path) -> None:
    cfg = make_cfg(epochs=3, augment="crop_flip", schedule="onecycle", optimizer="adam", patience=5)
    straight = train_run(cfg, data, **QUIET)

    def stop_after_first(record: EpochRecord, model: torch.nn.Module) -> None:
        if record.epoch == 1:
            raise Interrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, data, resume_dir=tmp_path / "state", on_epoch=stop_after_first, **QUIET)
    assert (tmp_path / "state" / "state.safetensors").is_file()
    seen: list[int] = []
    resumed = train_run(cfg, data, resume_dir=tmp_path / "state", **QUIET,
                        on_epoch=lambda record, model: seen.append(record.epoch))
    assert seen == [2, 3]
    assert metrics_of(resumed.history) == metrics_of(straight.history)
    assert resumed.best_epoch == straight.best_epoch and resumed.stop_reason == straight.stop_reason
    assert same_weights(resumed.model.state_dict(), straight.model.state_dict())
    # A finished state is not re-trained; another run_id ignores it.
    again = train_run(cfg, data, resume_dir=tmp_path / "state", **QUIET)
    assert metrics_of(again.history) == metrics_of(straight.history) and again.epochs_run == 3
    other = train_run(make_cfg(epochs=1), data, resume_dir=tmp_path / "state", **QUIET)
    assert other.epochs_run == 1


def test_evaluation_batches_are_capped_by_input_values_and_score_the_same(monkeypatch) -> None:
    """Large images are scored in smaller batches than eval.batch_size asks (their activations would not fit)."""
    from cnnpipe.engine import inference

    torch.manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 8, 8), dtype=torch.uint8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    seen: list[int] = []
    model[1].register_forward_hook(lambda _m, inputs, _out: seen.append(int(inputs[0].shape[0])))
    kwargs = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "batch_size": 20}
    whole = evaluate_logits(model, images, **kwargs)
    assert seen == [20, 20, 10]  # below the cap: eval.batch_size as given
    seen.clear()
    monkeypatch.setattr(inference, "EVAL_BATCH_VALUES", 7 * 3 * 8 * 8 + 5)  # room for 7 images a batch
    capped = evaluate_logits(model, images, **kwargs)
    assert seen == [7] * 7 + [1]
    assert torch.allclose(capped, whole, atol=1e-6)
