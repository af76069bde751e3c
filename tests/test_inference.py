"""The inference copy ``evaluate_logits`` scores with: same function, the caller's model untouched.

BatchNorm folding and the ReLU/MaxPool swap are exact rewrites up to float
rounding, and 2x2 max pooling as two maxima gives equal values; they are
checked against the original model in eval mode on every layout they
rewrite (conv -> BN, conv -> pool -> BN with positive and with negative
scales, Linear -> BN1d, the ResNet block), with non-trivial running
statistics. Test-time augmentation (flip) is checked against its definition.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cnnpipe.engine.inference import evaluate_logits
from cnnpipe.engine.inference import MaxPool2x2, inference_copy
from cnnpipe.evaluation.score import resolve_tta, train_subset
from cnnpipe.models.build import build_model
from cnnpipe.models.presets import PRESETS

MEAN, STD = [0.3], [0.3]


def _with_stats(model: nn.Module, shape: tuple[int, ...], negate_bn: bool = False) -> nn.Module:
    """Random BN weights (optionally all negative) and running stats from a few training batches."""
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                module.weight.uniform_(0.5, 1.5).mul_(-1 if negate_bn else 1)
                module.bias.uniform_(-0.5, 0.5)
        model.train()
        for _ in range(3):
            model(torch.randn(8, *shape) * 2 + 0.5)
    return model.eval()


def _reference(model: nn.Module, images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    with torch.no_grad():
        return model((images.float() / 255 - m) / s)


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


CONV_POOL_BN = [{"conv": 8, "kernel": 3, "padding": 1}, {"maxpool": 2}, "batchnorm", "relu", "flatten",
                {"linear": 16}, "batchnorm", "relu", "linear"]
CONV_BN = [{"conv": 8, "kernel": 3, "padding": 1}, "batchnorm", "relu", {"maxpool": 2}, "flatten", "linear"]


@pytest.mark.parametrize("layers,negate,left", [
    (CONV_BN, False, 0),
    (CONV_POOL_BN, False, 0),
    (CONV_POOL_BN, True, 1),  # a negative scale does not commute with max: that BN stays
    (PRESETS["fashion_vgg"], False, 0),
])
def test_folded_copy_computes_the_same_function(layers: list, negate: bool, left: int) -> None:
    model = _with_stats(build_model(layers, (1, 28, 28), 10), (1, 28, 28), negate)
    before = copy.deepcopy(model.state_dict())
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    net = inference_copy(model)
    assert _count(net, nn.BatchNorm2d) == left and _count(net, nn.BatchNorm1d) == 0
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    got = evaluate_logits(model, images, mean=MEAN, std=STD, batch_size=5)
    torch.testing.assert_close(got, _reference(model, images, MEAN, STD), rtol=1e-4, atol=1e-4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model untouched
    assert _count(model, nn.BatchNorm2d) >= 1


def test_resnet_blocks_fold_too() -> None:
    layers = [{"conv": 8, "kernel": 3, "padding": 1}, "batchnorm", "relu", {"residual": 8},
              {"residual": 16, "stride": 2}, "global_avgpool", "flatten", "linear"]
    model = _with_stats(build_model(layers, (3, 16, 16), 10), (3, 16, 16))
    images = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    mean, std = [0.5] * 3, [0.25] * 3
    assert _count(inference_copy(model), nn.BatchNorm2d) == 0
    torch.testing.assert_close(evaluate_logits(model, images, mean=mean, std=std, batch_size=3),
                               _reference(model, images, mean, std), rtol=1e-4, atol=1e-4)


def test_flip_tta_averages_the_mirror_images_probabilities() -> None:
    model = _with_stats(build_model(CONV_BN, (1, 28, 28), 10), (1, 28, 28))
    images = torch.randint(0, 256, (12, 1, 28, 28), dtype=torch.uint8)
    got = evaluate_logits(model, images, mean=MEAN, std=STD, batch_size=5, tta="flip")
    plain = _reference(model, images, MEAN, STD).softmax(1)
    mirrored = _reference(model, images.flip(3), MEAN, STD).softmax(1)
    torch.testing.assert_close(got.exp(), (plain + mirrored) / 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.exp().sum(1), torch.ones(12))


def test_tta_auto_follows_the_dataset_and_the_train_subset_is_fixed() -> None:
    assert resolve_tta("auto", "fashion-mnist", "crop_flip") == "flip" and resolve_tta("auto", "cifar10", "flip") == "flip"
    assert resolve_tta("auto", "fashion-mnist", "none") == "none" and resolve_tta("auto", "cifar10", "crop") == "none"
    assert resolve_tta("auto", "mnist", "crop_flip") == "none" and resolve_tta("auto", "kmnist", None) == "none"
    assert resolve_tta("none", "cifar10", "flip") == "none" and resolve_tta("flip", "mnist", "none") == "flip"
    assert train_subset(500, 1000) is None
    first, again = train_subset(54_000), train_subset(54_000)
    assert torch.equal(first, again) and len(first) == 10_000 and len(set(first.tolist())) == 10_000
    assert bool((first[1:] > first[:-1]).all()) and int(first.max()) < 54_000


PLAIN_POOL = {"kernel_size": 2, "stride": 2, "padding": 0, "dilation": 1, "return_indices": False, "ceil_mode": False}
OTHER_VALUE = {"kernel_size": 3, "stride": 1, "padding": 1, "dilation": 2, "return_indices": True, "ceil_mode": True}


def test_every_max_pool_setting_but_the_plain_2x2_keeps_nn_maxpool2d() -> None:
    """The rewrite applies to 2x2/stride-2 pooling only: a change in any one MaxPool2d field keeps the original."""
    assert set(PLAIN_POOL) == set(OTHER_VALUE) == {
        name for name in nn.MaxPool2d.__constants__ if name in nn.MaxPool2d(2).__dict__}
    for settings, rewritten in [(PLAIN_POOL, True), ({**PLAIN_POOL, "stride": None}, True),
                                ({**PLAIN_POOL, "kernel_size": (2, 2), "stride": (2, 2)}, True),
                                *(({**PLAIN_POOL, key: value}, False) for key, value in OTHER_VALUE.items())]:
        net = inference_copy(nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(**settings), nn.Flatten()))
        assert (_count(net, MaxPool2x2), _count(net, nn.MaxPool2d)) == ((1, 0) if rewritten else (0, 1)), settings


@pytest.mark.parametrize("height,width", [(8, 8), (9, 7), (2, 3), (1, 4)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_maxpool2x2_equals_maxpool2d_value_for_value(height: int, width: int, channels_last: bool) -> None:
    """Odd sizes (the last row/column dropped), ties, infinities and NaN, in both layouts.

    Equal as floats: of a tie between -0.0 and +0.0 either zero may be kept (they compare equal).
    """
    torch.manual_seed(0)
    x = torch.randn(3, 6, height, width).round()  # rounding makes ties
    x.view(-1)[::7] = -0.0
    x.view(-1)[1::11] = float("inf")
    x.view(-1)[2::13] = float("-inf")
    x.view(-1)[3::17] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if height < 2:
        for pool in (nn.MaxPool2d(2), MaxPool2x2()):
            with pytest.raises(RuntimeError, match="Output size is too small"):
                pool(x)
        return
    want, got = nn.MaxPool2d(2)(x), MaxPool2x2()(x)
    assert got.shape == want.shape
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last or min(height, width) < 4


def test_fashion_tutorial_scores_the_same_logits_with_the_fast_pooling() -> None:
    """The presets' {maxpool: 2} layers are rewritten, and the logits equal those of an unrewritten copy."""
    torch.manual_seed(1)
    model = build_model(PRESETS["fashion_tutorial"], (1, 28, 28), 10).eval()
    images = torch.randint(0, 256, (40, 1, 28, 28), dtype=torch.uint8)
    assert _count(inference_copy(model), MaxPool2x2) == 2
    got = evaluate_logits(model, images, mean=MEAN, std=STD, batch_size=16)
    torch.testing.assert_close(got, _reference(model, images, MEAN, STD), rtol=1e-5, atol=1e-5)
