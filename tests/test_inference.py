"""The inference copy ``evaluate_logits`` scores with: same function, the caller's model untouched.

BatchNorm folding and the ReLU/MaxPool swap are exact rewrites up to float
rounding; they are checked against the original model in eval mode on every
layout they rewrite (conv -> BN, conv -> pool -> BN with positive and with
negative scales, Linear -> BN1d, the ResNet block), with non-trivial running
statistics. Test-time augmentation (flip) is checked against its definition.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cnnpipe.engine import evaluate_logits
from cnnpipe.engine.inference import inference_copy
from cnnpipe.evaluation import resolve_tta, train_subset
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
