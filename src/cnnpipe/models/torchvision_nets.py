"""Build a torchvision classifier for a dataset: new head, any channel count, pinned pretrained weights.

``TorchvisionNet`` wraps ``torchvision.models.get_model(arch, weights=None)``
as three parts, so that a frozen body can be run apart from its head (the
fine-tuning strategies, and a cache of backbone features, need exactly that
seam):

* ``adapter``: a 1-channel dataset is fed to the 3-channel network by
  replicating the input; the engine normalizes the single channel with the
  average of the weights' three mean/std values, and the adapter's fixed
  per-channel affine map turns that exactly into the three per-channel
  ImageNet normalizations (for 3-channel data it is the identity);
* ``body``: the torchvision network with its final ``nn.Linear`` (``fc``,
  ``classifier[-1]``, ``heads.head``, ... found generically: the last Linear
  registered) replaced by ``nn.Identity``, so it returns features;
* ``head``: a new ``nn.Linear(features, num_classes)``.

Pretrained weights are loaded into the body only (the source's classifier is
for other classes), from a state dict the weights stage fetched and verified
(``pinned_weights.load_pinned``). A checkpoint rebuilds the same module
with ``weights=None`` and loads its own ``model.safetensors``: it never
needs the pretrained file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cnnpipe.models.weights_file import fit_problem
from cnnpipe.util.errors import CheckpointError


class ChannelAdapter(nn.Module):
    """C input channels -> 3: identity for 3, for 1 a replicated channel under a per-channel affine map.

    ``scale``/``shift`` are derived from the layer spec (not learned, not
    saved in the state dict): ``(x * s + m - m_c) / s_c`` for the single
    channel normalized with (m, s) and the weights' per-channel (m_c, s_c).
    """

    def __init__(self, in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        if self.in_channels not in (1, 3):
            raise ValueError(f"torchvision models take 1 or 3 channels, got {in_channels}")
        scale = torch.ones(3)
        shift = torch.zeros(3)
        if self.in_channels == 1 and mean is not None and std is not None:
            m, s = sum(mean) / 3.0, sum(std) / 3.0
            scale = torch.tensor([s / sc for sc in std], dtype=torch.float32)
            shift = torch.tensor([(m - mc) / sc for mc, sc in zip(mean, std)], dtype=torch.float32)
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels == 3:
            return x
        return torch.addcmul(self.shift, x.expand(-1, 3, -1, -1), self.scale)


class TorchvisionNet(nn.Module):
    """adapter -> body (features) -> head (class scores); see the module docstring."""

    def __init__(self, adapter: ChannelAdapter, body: nn.Module, head: nn.Linear, arch: str, head_path: str) -> None:
        super().__init__()
        self.adapter = adapter
        self.body = body
        self.head = head
        self.arch = arch
        self.head_path = head_path  # where the replaced classifier sat in the torchvision net (e.g. ``fc``)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head sees: the body's output for normalized input images."""
        return self.body(self.adapter(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def last_linear(net: nn.Module) -> tuple[str, nn.Linear] | None:
    """The final classifier: the last ``nn.Linear`` registered (``fc``, ``classifier.6``, ``heads.head``, ...)."""
    found = None
    for name, module in net.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    return found


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def bare_network(spec: Mapping[str, Any]) -> tuple[nn.Module, str, int]:
    """``get_model(arch, weights=None)`` with its classifier replaced by Identity: (body, classifier path, features)."""
    import torchvision

    arch = spec["torchvision"]
    net = torchvision.models.get_model(arch, weights=None, **dict(spec.get("kwargs") or {}))
    found = last_linear(net)
    if found is None:
        raise ValueError(f"torchvision:{arch} has no final nn.Linear classifier to replace; pick another architecture")
    path, linear = found
    _set_module(net, path, nn.Identity())
    return net, path, int(linear.in_features)


def build_torchvision(spec: Mapping[str, Any], in_shape: Sequence[int], num_classes: int,
                      body_state: Mapping[str, torch.Tensor] | None = None) -> TorchvisionNet:
    """The network of ``spec`` for ``in_shape`` (C x H x W) and ``num_classes``.

    ``body_state`` (pretrained weights without their classifier) is loaded
    into the body, strictly: a key missing or left over is one line naming
    the first of them. The head is initialised from the global RNG after
    the body, so a seeded build is reproducible.
    """
    channels = int(in_shape[0])
    if channels != int(spec.get("in_channels", channels)):
        raise ValueError(f"torchvision:{spec['torchvision']} was resolved for {spec['in_channels']} channels, "
                         f"the data has {channels}")
    body, path, features = bare_network(spec)
    if body_state is not None:
        load_body_state(body, body_state, f"pretrained weights for torchvision:{spec['torchvision']}")
    head = nn.Linear(features, int(num_classes))
    adapter = ChannelAdapter(channels, spec.get("mean"), spec.get("std"))
    return TorchvisionNet(adapter, body, head, spec["torchvision"], path)


def load_body_state(body: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    problem = fit_problem(body.state_dict(), state)
    if problem is not None:
        raise CheckpointError(f"{what} do not fit the architecture ({problem}); they are for another network")
    body.load_state_dict(dict(state), strict=True)


# --------------------------------------------------------------------------- summary (show-model, models/best/summary.txt)


def _shape(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "x".join(str(d) for d in value.shape[1:])
    return type(value).__name__


def summary_rows(model: TorchvisionNet, in_shape: Sequence[int]) -> list[dict[str, Any]]:
    """One row per top-level child of the torchvision body (then the head): output shape and parameters.

    Shapes come from one forward pass of a single zero image through hooks.
    """
    shapes: dict[str, str] = {}
    hooks = [child.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, _shape(out)))
             for name, child in model.body.named_children()]
    hooks.append(model.head.register_forward_hook(lambda _m, _i, out: shapes.__setitem__("head", _shape(out))))
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *(int(d) for d in in_shape)))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    rows = [{"index": "", "layer": "input", "output_shape": "x".join(str(int(d)) for d in in_shape), "params": 0}]
    for index, (name, child) in enumerate(model.body.named_children()):
        label = f"{name} ({type(child).__name__})" if name != model.head_path else f"{name} (replaced: Identity)"
        rows.append({"index": index, "layer": label, "output_shape": shapes.get(name, "-"),
                     "params": sum(p.numel() for p in child.parameters())})
    rows.append({"index": len(rows) - 1, "layer": f"head (Linear {model.head.in_features}->{model.head.out_features})",
                 "output_shape": shapes.get("head", "-"), "params": sum(p.numel() for p in model.head.parameters())})
    return rows


def summary_text(name: str, model: TorchvisionNet, in_shape: Sequence[int]) -> str:
    rows = summary_rows(model, in_shape)
    width = max(len(str(r["layer"])) for r in rows) + 2
    lines = [f"model {name}", f"{'#':>3}  {'layer':<{width}}{'output':<14}{'params':>12}"]
    for row in rows:
        lines.append(f"{row['index']!s:>3}  {row['layer']:<{width}}{row['output_shape']:<14}{row['params']:>12,}")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lines.append(f"total parameters: {total:,}")
    lines.append(f"trainable parameters: {trainable:,} (head only: {sum(p.numel() for p in model.head.parameters()):,})")
    return "\n".join(lines)


def model_summary(name: str, spec: Mapping[str, Any], in_shape: Sequence[int], num_classes: int) -> str:
    """The summary of a torchvision spec, built with random weights (the architecture, not the values)."""
    with torch.random.fork_rng(devices=[]):
        model = build_torchvision(spec, in_shape, num_classes)
    return summary_text(name, model, in_shape)
