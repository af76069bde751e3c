"""torchvision architectures by name: ``model: torchvision:resnet18``, checked without building a network.

A torchvision model's resolved "layer spec" (``RunConfig.layers``) is a
one-element tuple holding a mapping::

    ({"torchvision": "resnet18", "weights": "IMAGENET1K_V1", "in_channels": 1,
      "weights_sha256": "<hex>", "mean": [...], "std": [...]},)

``weights`` is the explicit torchvision weights name (``DEFAULT`` resolved, so
a torchvision upgrade that moves DEFAULT cannot silently change a run),
``none`` (random initialisation) or ``custom`` (a file, URL or cnnpipe
checkpoint named by ``pretrained.weights``). The train stage pins the mapping
with the fetched weights' SHA-256 and their normalization
(``cnnpipe.models.pinned_weights.pin_layers``); since run ids, the run
cache key and the run-state identity all hash ``layers``, other weights are
always another run.

This module imports torchvision only inside functions, and only for
torchvision names, so ``cnnpipe validate`` of a preset grid stays fast.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
import re
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

PREFIX = "torchvision:"
NO_WEIGHTS = "none"
CUSTOM = "custom"  # a file, URL or cnnpipe checkpoint: identified by its SHA-256 alone
ENUM_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
# Constructor options that differ from torchvision's defaults: no auxiliary classifiers (their extra
# outputs would break every consumer of "logits"); pretrained inception nets expect transform_input.
_ARCH_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
_TRANSFORM_INPUT = ("googlenet", "inception_v3")


def source_kind(weights: str) -> str:
    """none | torchvision | url | registry | checkpoint | file (by the form of ``pretrained.weights``)."""
    if weights == NO_WEIGHTS:
        return "none"
    if ENUM_NAME.fullmatch(weights):
        return "torchvision"
    if weights.startswith(("http://", "https://")):
        return "url"
    if weights.startswith("models:/"):
        return "registry"
    if Path(weights).is_dir():
        return "checkpoint"
    return "file"


def is_name(name: Any) -> bool:
    """``torchvision:<arch>``."""
    return isinstance(name, str) and name.startswith(PREFIX)


def arch_of(name: str) -> str:
    return name[len(PREFIX):]


def spec_of(layers: Any) -> dict[str, Any] | None:
    """The torchvision mapping of a resolved layer spec, or None for a list of cnnpipe layers."""
    if isinstance(layers, (list, tuple)) and len(layers) == 1 and isinstance(layers[0], Mapping) \
            and "torchvision" in layers[0]:
        return dict(layers[0])
    return None


def is_pretrained(spec: Mapping[str, Any] | None) -> bool:
    return spec is not None and spec.get("weights", NO_WEIGHTS) != NO_WEIGHTS


def architectures() -> list[str]:
    """Every classification architecture torchvision ships (``list_models(module=torchvision.models)``)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str, where: str) -> None:
    """One line for an unknown architecture, with the closest names."""
    known = architectures()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=3, cutoff=0.5)
        hint = f", did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise ValueError(f"{where}: unknown torchvision model {arch!r}{hint} "
                         f"(any of torchvision.models.list_models(), e.g. torchvision:resnet18)")
    if not has_linear_classifier(arch):
        raise ValueError(f"{where}: torchvision:{arch} ends in no nn.Linear classifier (its head is a convolution), "
                         "so cnnpipe cannot give it a head for your classes; pick another architecture")


def weights_enum(arch: str) -> Any:
    import torchvision

    return torchvision.models.get_model_weights(arch)


def resolve_weights_name(arch: str, name: str) -> Any:
    """The torchvision weights member ``name`` of ``arch`` (``DEFAULT`` becomes its explicit member)."""
    enum = weights_enum(arch)
    members = [member for member in enum.__members__ if member != "DEFAULT"]
    if name not in enum.__members__:
        raise ValueError(f"pretrained.weights {name!r} is not a weights name of torchvision:{arch}; "
                         f"use one of {', '.join(members + ['DEFAULT'])}, none, a file or URL (with pretrained.sha256) "
                         "or a cnnpipe checkpoint")
    member = enum[name]
    return enum[member.name]  # DEFAULT is an alias: .name is the explicit member's


def reference_weights(arch: str) -> Any:
    """The weights whose metadata (min_size, mean/std) describe ``arch`` when no enum member is named."""
    return weights_enum(arch).DEFAULT


@lru_cache(maxsize=None)
def has_linear_classifier(arch: str) -> bool:
    """Whether ``arch`` has an ``nn.Linear`` to replace with a new head (squeezenet classifies with a conv).

    Built on the meta device (the modules only: no memory, no initialisation).
    The RegNets compute their widths with real tensors and cannot be built
    there; like every torchvision classifier but squeezenet they end in a
    Linear, and a build that finds none still fails in one line.
    """
    import torch
    import torchvision

    try:
        with torch.device("meta"):
            net = torchvision.models.get_model(arch, weights=None, **_ARCH_KWARGS.get(arch, {}))
    except (NotImplementedError, RuntimeError):
        return True
    return any(isinstance(module, torch.nn.Linear) for module in net.modules())


def min_size(arch: str) -> tuple[int, int]:
    size = reference_weights(arch).meta.get("min_size", (1, 1))
    return int(size[0]), int(size[1])


def weights_normalization(weights: Any) -> tuple[list[float], list[float]]:
    """The mean/std of a torchvision weights member's own ``transforms()`` (ImageNet's for most)."""
    transform = weights.transforms()
    return [float(v) for v in transform.mean], [float(v) for v in transform.std]


def check_image_size(arch: str, image_shape: Sequence[int], where: str) -> None:
    """Refuse inputs smaller than the architecture's ``min_size`` (its pooling would shrink them to nothing)."""
    low_h, low_w = min_size(arch)
    _, height, width = (int(d) for d in image_shape)
    if height < low_h or width < low_w:
        raise ValueError(f"{where}: torchvision:{arch} needs images of at least {low_h}x{low_w} pixels, the data gives "
                         f"{height}x{width}; raise data.image_size (folder datasets) or pick a smaller network")


def layer_spec(arch: str, weights: str, in_channels: int) -> tuple[dict[str, Any], ...]:
    """The unpinned mapping of ``arch`` for ``pretrained.weights`` (an enum name, none, or a custom source)."""
    if weights == NO_WEIGHTS:
        label = NO_WEIGHTS
    elif ENUM_NAME.fullmatch(weights):
        label = resolve_weights_name(arch, weights).name
    else:
        label = CUSTOM
    spec: dict[str, Any] = {"torchvision": arch, "weights": label, "in_channels": int(in_channels)}
    kwargs = dict(_ARCH_KWARGS.get(arch, {}))
    if arch in _TRANSFORM_INPUT and label != NO_WEIGHTS:
        kwargs["transform_input"] = True  # what torchvision sets for its pretrained inception weights
    if kwargs:
        spec["kwargs"] = kwargs
    return (spec,)


def run_normalization(layers: Any, mean: Sequence[float], std: Sequence[float]) -> tuple[list[float], list[float]]:
    """The input normalization a run trains and is served with: the weights' own when pretrained.

    ``mean``/``std`` are the train split's statistics (used for presets and
    randomly initialised torchvision nets). A pretrained net on 1-channel
    data gets one mean/std (the average of the weights' three); the network's
    input adapter maps it exactly onto the three per-channel normalizations
    (``torchvision_nets.ChannelAdapter``).
    """
    spec = spec_of(layers)
    if spec is None or not is_pretrained(spec) or "mean" not in spec:
        return [float(v) for v in mean], [float(v) for v in std]
    if int(spec["in_channels"]) == 1:
        return [sum(spec["mean"]) / 3.0], [sum(spec["std"]) / 3.0]
    return [float(v) for v in spec["mean"]], [float(v) for v in spec["std"]]
