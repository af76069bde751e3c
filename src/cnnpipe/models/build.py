"""Turn a checked layer spec into a ``torch.nn.Sequential``.

The spec grammar, shapes and parameter counts live in ``cnnpipe.models.spec``
(pure Python, so ``cnnpipe validate`` never imports torch). This module only
maps each normalized ``LayerInfo`` to a module, so the two can never disagree
about shapes: the builder reads every size from the spec's inferred shapes,
and a test checks that parameter counts match ``LayerInfo.params``.

Child ``i`` of the Sequential is spec layer ``i``, so a module path such as
``4.conv1`` (used in state-dict keys and layer statistics) points straight
back at the YAML line that made it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cnnpipe.models import torchvision_spec
from cnnpipe.models.spec import LayerInfo, model_summary as layers_summary, normalize_layers
from cnnpipe.util.errors import ParamsError
from cnnpipe.models.pinned_weights import load_pinned


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm and an identity (or 1x1 projection) shortcut.

    The projection (1x1 conv + BN) is used only when the stride or the channel
    count changes, exactly as ``spec.normalize_layers`` counts parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()
        # Zero-init the last BN scale: each block starts as the identity, which
        # trains faster and more stably (Goyal et al., "Accurate, Large Minibatch SGD").
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _module(spec: dict[str, Any], in_shape: tuple[int, ...]) -> nn.Module:
    """One spec layer -> one module; ``in_shape`` is the layer's input shape."""
    kind = spec["type"]
    if kind == "conv":
        return nn.Conv2d(in_shape[0], spec["out"], spec["kernel"], stride=spec["stride"], padding=spec["padding"], bias=spec["bias"])
    if kind == "residual":
        return BasicBlock(in_shape[0], spec["out"], spec["stride"])
    if kind == "maxpool":
        return nn.MaxPool2d(spec["kernel"], stride=spec["stride"], padding=spec["padding"])
    if kind == "avgpool":
        return nn.AvgPool2d(spec["kernel"], stride=spec["stride"], padding=spec["padding"])
    if kind == "global_avgpool":
        return nn.AdaptiveAvgPool2d(1)
    if kind == "batchnorm":
        return nn.BatchNorm2d(in_shape[0]) if len(in_shape) == 3 else nn.BatchNorm1d(in_shape[0])
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "gelu":
        return nn.GELU()
    if kind == "flatten":
        return nn.Flatten()
    if kind == "dropout":
        return nn.Dropout(float(spec["p"]))
    if kind == "linear":
        return nn.Linear(in_shape[0], spec["out"], bias=spec["bias"])
    # normalize_layers rejects unknown types first; reaching here is a programming error.
    raise ValueError(f"no builder for layer type {kind!r}")


def build_from_infos(infos: Sequence[LayerInfo], in_shape: Sequence[int]) -> nn.Sequential:
    """Build from already-normalized layers (saves re-validating a spec twice)."""
    modules: list[nn.Module] = []
    shape: tuple[int, ...] = tuple(in_shape)
    for info in infos:
        modules.append(_module(info.spec, shape))
        shape = info.out_shape
    return nn.Sequential(*modules)


def build_model(layers: Sequence[Any], in_shape: Sequence[int], num_classes: int, *, where: str = "model",
                weights_dir: str | os.PathLike[str] | None = None) -> nn.Module:
    """Build the network for a raw layer spec (YAML data) and a C x H x W input.

    Raises ``ParamsError`` (one line, naming ``where`` and the layer index) for
    a spec that cannot be built. Weights use torch's default initialisation,
    drawn from the global RNG: seed it first for a reproducible model.

    A torchvision spec (``models.torchvision_spec``) builds a
    ``TorchvisionNet``; with ``weights_dir`` (the weights stage's output) its
    body starts from the pinned pretrained weights, without it from random
    ones (a checkpoint then loads its own state dict over them).
    """
    shape = tuple(int(d) for d in in_shape)
    spec = torchvision_spec.spec_of(layers)
    if spec is not None:
        from cnnpipe.models.torchvision_nets import build_torchvision

        state = None
        if weights_dir is not None and torchvision_spec.is_pretrained(spec):
            state = load_pinned(spec, weights_dir)
        try:
            return build_torchvision(spec, shape, int(num_classes), body_state=state)
        except ValueError as err:
            raise ParamsError(f"{where}: {err}", source="") from None
    infos = normalize_layers(where, list(layers), shape, int(num_classes))  # type: ignore[arg-type]
    return build_from_infos(infos, shape)


def rebuild_model(layers: Sequence[Any], in_shape: Sequence[int], num_classes: int, state_dict: dict[str, Any], *,
                  where: str = "model") -> nn.Module:
    """The architecture with ``state_dict`` loaded: CPU, eval mode, like a trained run returns it."""
    model = build_model(list(layers), in_shape, num_classes, where=where)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def count_params(model: nn.Module) -> int:
    """Number of trainable parameters (what ``LayerInfo.params`` sums to)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_summary(name: str, layers: Any, in_shape: Any, num_classes: int) -> str:
    """The layer table of any resolved spec: ``spec.model_summary``, or a built torchvision net's children."""
    spec = torchvision_spec.spec_of(layers)
    if spec is None:
        return layers_summary(name, layers, in_shape, num_classes)
    from cnnpipe.models.torchvision_nets import model_summary as torchvision_summary

    return torchvision_summary(name, spec, tuple(int(x) for x in in_shape), num_classes)
