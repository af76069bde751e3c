"""build_model: every preset builds, shapes and parameter counts agree with the spec."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cnnpipe.util.errors import ParamsError
from cnnpipe.models.build import BasicBlock, build_model, count_params
from cnnpipe.models.presets import PRESETS
from cnnpipe.models.spec import normalize_layers

SHAPES = [(1, 28, 28), (3, 28, 28), (1, 32, 32), (3, 32, 32)]


def _fits(layers: list, shape: tuple[int, int, int], classes: int) -> bool:
    try:
        normalize_layers("t", layers, shape, classes)
    except ParamsError:
        return False
    return True


def test_original_presets_are_unchanged() -> None:
    assert PRESETS["fashion_tutorial"][0] == {"conv": 6, "kernel": 5}
    assert PRESETS["mnist_net"][-2] == {"linear": 1000}
    assert PRESETS["cifar_net"][0] == {"conv": 32, "kernel": 3, "padding": 1}
    assert {"fashion_vgg", "cifar_resnet"} <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_builds_with_spec_shapes_and_param_counts(name: str) -> None:
    built = 0
    for shape in SHAPES:
        if not _fits(PRESETS[name], shape, 10):
            continue
        infos = normalize_layers(name, PRESETS[name], shape, 10)
        torch.manual_seed(0)
        model = build_model(PRESETS[name], shape, 10).eval()
        assert count_params(model) == sum(info.params for info in infos)
        for child, info in zip(model, infos):  # layer by layer, not just in total
            assert sum(p.numel() for p in child.parameters()) == info.params, info.label
        with torch.no_grad():
            out = model(torch.randn(2, *shape))
        assert out.shape == (2, 10)
        built += 1
    # every preset serves at least its own kind of data (28x28 grey or 32x32 colour)
    assert built >= 1
    if name.startswith(("fashion", "mnist")):
        assert _fits(PRESETS[name], (1, 28, 28), 10)
    if name.startswith("cifar"):
        assert _fits(PRESETS[name], (3, 32, 32), 10)


def test_intermediate_shapes_match_spec() -> None:
    layers = PRESETS["fashion_vgg"]
    infos = normalize_layers("t", layers, (1, 28, 28), 10)
    x = torch.randn(2, 1, 28, 28)
    model = build_model(layers, (1, 28, 28), 10).eval()
    with torch.no_grad():
        for child, info in zip(model, infos):
            x = child(x)
            assert tuple(x.shape[1:]) == info.out_shape, info.label


def test_residual_block_identity_and_projection() -> None:
    layers = [{"conv": 16, "kernel": 3, "padding": 1}, {"residual": 16}, {"residual": 32, "stride": 2},
              "global_avgpool", "flatten", "linear"]
    infos = normalize_layers("t", layers, (3, 32, 32), 7)
    model = build_model(layers, (3, 32, 32), 7)
    assert isinstance(model[1], BasicBlock) and isinstance(model[1].shortcut, nn.Identity)
    assert isinstance(model[2].shortcut, nn.Sequential)
    assert count_params(model) == sum(i.params for i in infos)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert infos[2].out_shape == (32, 16, 16)


def test_batchnorm_picks_1d_or_2d_and_state_dict_names_follow_spec_index() -> None:
    layers = [{"conv": 4, "kernel": 3}, "batchnorm", "relu", {"avgpool": 2}, "flatten", {"linear": 8}, "batchnorm",
              "gelu", {"dropout": 0.1}, "linear"]
    model = build_model(layers, (1, 10, 10), 3)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[6], nn.BatchNorm1d)
    assert isinstance(model[3], nn.AvgPool2d) and isinstance(model[7], nn.GELU)
    assert "0.weight" in model.state_dict() and "6.running_mean" in model.state_dict()
    assert model(torch.randn(4, 1, 10, 10)).shape == (4, 3)


def test_same_padding_and_bias_false() -> None:
    layers = [{"conv": 5, "kernel": 5, "padding": "same", "bias": False}, "flatten", "linear"]
    model = build_model(layers, (2, 6, 6), 4)
    assert model[0].padding == (2, 2) and model[0].bias is None
    assert count_params(model) == 5 * 2 * 25 + (5 * 36 * 4 + 4)


def test_bad_spec_is_one_params_error_line() -> None:
    with pytest.raises(ParamsError, match=r"unknown layer type 'convv'.*did you mean conv") as info:
        build_model([{"convv": 3}, "flatten", "linear"], (1, 28, 28), 10)
    assert "\n" not in str(info.value)


def test_same_seed_same_weights() -> None:
    torch.manual_seed(3)
    a = build_model(PRESETS["fashion_tutorial"], (1, 28, 28), 10)
    torch.manual_seed(3)
    b = build_model(PRESETS["fashion_tutorial"], (1, 28, 28), 10)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
