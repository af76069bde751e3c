"""Weight EMA (training key ``ema``): the average it keeps, and that the engine validates and returns it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cnnpipe.engine.data import TrainData
from cnnpipe.engine.inference import evaluate_logits
from cnnpipe.engine.loop import train_run
from cnnpipe.engine.ema import make_ema
from test_engine import QUIET, make_cfg


@pytest.fixture
def data(prepared_dir: Path) -> TrainData:
    return TrainData.load(prepared_dir)


def test_off_by_default_and_the_average_follows_its_formula() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert make_ema(model, optimizer, 0.0) is None
    ema = make_ema(model, optimizer, 0.9)
    assert ema is not None
    expected = None
    for step in range(4):
        loss = model(torch.randn(8, 3)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()  # the post-step hook updates the average
        current = model[0].weight.detach().clone()
        if expected is None:
            expected = current  # the first update copies
        else:
            decay = min(0.9, (1 + step) / (10 + step))  # warm-up: num_averaged == step here
            expected = decay * expected + (1 - decay) * current
        torch.testing.assert_close(ema.module[0].weight, expected)
    assert int(ema.module[1].num_batches_tracked) == 4
    torch.testing.assert_close(ema.module[1].running_mean, ema.averaged.module[1].running_mean)
    assert not torch.equal(ema.module[0].weight, model[0].weight)


def test_engine_validates_and_returns_the_averaged_weights(data: TrainData) -> None:
    plain = train_run(make_cfg(epochs=2, patience=5), data, **QUIET)
    averaged = train_run(make_cfg(epochs=2, patience=5, ema=0.9), data, **QUIET)
    assert averaged.status == "finished" and averaged.model is not None and averaged.best is not None
    assert averaged.history[-1].val_loss != plain.history[-1].val_loss
    assert averaged.history[-1].train_loss == pytest.approx(plain.history[-1].train_loss)  # same training path
    # what was validated (and selected) is what is returned
    logits = evaluate_logits(averaged.model, data.val.images, mean=data.mean, std=data.std)
    assert float(F.cross_entropy(logits, data.val.labels)) == pytest.approx(averaged.best.val_loss, rel=1e-5)


@pytest.mark.slow
def test_an_interrupted_ema_run_resumes_to_the_same_result(data: TrainData, tmp_path: Path) -> None:
    from test_engine import Interrupt, metrics_of, same_weights

    cfg = make_cfg(epochs=3, augment="crop_flip", schedule="onecycle", patience=5, ema=0.95)
    straight = train_run(cfg, data, **QUIET)

    def stop_after_first(record, model) -> None:
        if record.epoch == 1:
            raise Interrupt

    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, data, resume_dir=tmp_path / "state", on_epoch=stop_after_first, **QUIET)
    resumed = train_run(cfg, data, resume_dir=tmp_path / "state", **QUIET)
    assert metrics_of(resumed.history) == metrics_of(straight.history)  # the average was resumed too
    assert same_weights(resumed.model.state_dict(), straight.model.state_dict())
