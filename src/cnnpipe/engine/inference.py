"""Scoring a model: ``evaluate_logits`` on an inference-only copy (same function, less arithmetic).

Scoring never needs autograd, batch statistics or the training layout, so
``inference_copy`` gives ``evaluate_logits`` a deep copy (the caller's model,
which may still be training, is never touched) with:

* every BatchNorm that directly follows a Conv2d or Linear folded into it
  (``torch.nn.utils.fusion``), and one after ``Conv2d -> MaxPool2d`` when
  its per-channel scale is positive (a positive scale commutes with max):
  one affine pass per layer fewer;
* ``ReLU -> MaxPool`` pairs swapped to ``MaxPool -> ReLU`` (both are
  monotone, so the outputs are identical) so the ReLU touches 4x fewer
  values;
* 2x2 / stride-2 max pooling (``{maxpool: 2}``) as two elementwise maxima
  over strided views (``MaxPool2x2``): equal values, since max is exact,
  and faster than ``nn.MaxPool2d`` on the CPU when the layer has few
  channels (NHWC pooling vectorises over channels: 6 channels leave the
  vector lanes mostly empty; figures in benchmarks/README.md). Training
  keeps ``nn.MaxPool2d``: its backward pass routes ties differently;
* channels_last (NHWC) for conv nets, which oneDNN runs fastest on the CPU
  and cuDNN on CUDA.

Outputs equal the original model's in eval mode up to float rounding (the
folded weights are rounded once). ``evaluate_logits`` is the one scoring
path: the training loop's validation (but for a head trained on cached
features), the evaluate stage and ``predict`` all call it, so a checkpoint
scores the same everywhere.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from cnnpipe.compute.device import resolve_device
from cnnpipe.data.resident_pages import ResidentCap
from cnnpipe.engine.augment import norm_constants, normalize
from cnnpipe.engine.data import on_device
from cnnpipe.engine.precision import autocast
from cnnpipe.models.build import BasicBlock

_FOLDABLE = ((nn.Conv2d, nn.BatchNorm2d, fuse_conv_bn_eval), (nn.Linear, nn.BatchNorm1d, fuse_linear_bn_eval))


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)`` for inference: max over rows, then over columns, of strided views."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] < 2 or x.shape[-1] < 2:
            return F.max_pool2d(x, 2)  # no 2x2 window: the same error as nn.MaxPool2d
        height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor, like MaxPool2d: an odd last row/column is dropped
        x = x[..., :height, :width]
        rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _is_plain_2x2_pool(module: nn.Module) -> bool:
    """A MaxPool2d that ``MaxPool2x2`` computes exactly: 2x2 window, stride 2, no padding, dilation, ceil or indices."""
    if type(module) is not nn.MaxPool2d or module.return_indices or module.ceil_mode:
        return False
    pair = lambda value: tuple(value) if isinstance(value, (tuple, list)) else (value, value)  # noqa: E731
    stride = module.stride if module.stride is not None else module.kernel_size
    return (pair(module.kernel_size) == (2, 2) and pair(stride) == (2, 2) and pair(module.padding) == (0, 0)
            and pair(module.dilation) == (1, 1))


def _fold(layer: nn.Module, norm: nn.Module) -> nn.Module | None:
    """``layer`` with ``norm`` folded in, or None when the pair cannot be folded."""
    if not getattr(norm, "track_running_stats", False) or norm.running_mean is None:
        return None
    for layer_type, norm_type, fuse in _FOLDABLE:
        if type(layer) is layer_type and type(norm) is norm_type:
            return fuse(layer, norm)
    return None


def _positive_scale(norm: nn.Module) -> bool:
    """True for an eval BatchNorm2d whose per-channel scale is > 0 everywhere (then it commutes with max pooling)."""
    if type(norm) is not nn.BatchNorm2d or norm.running_var is None:
        return False
    weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    return bool((weight > 0).all())


def _optimise_sequential(seq: nn.Sequential) -> None:
    """Fold (layer, norm) pairs and swap (ReLU, MaxPool2d) pairs in place."""
    modules = list(seq.children())
    out: list[nn.Module] = []
    i = 0
    while i < len(modules):
        here = modules[i]
        after = modules[i + 1] if i + 1 < len(modules) else None
        folded = _fold(here, after) if after is not None else None
        if folded is not None:
            out.append(folded)
            i += 2
            continue
        third = modules[i + 2] if i + 2 < len(modules) else None
        if type(after) is nn.MaxPool2d and third is not None and _positive_scale(third):
            folded = _fold(here, third)  # conv -> pool -> BN: a positive per-channel scale commutes with max
            if folded is not None:
                out.extend([folded, after])
                i += 3
                continue
        if isinstance(here, nn.ReLU) and type(after) is nn.MaxPool2d:
            out.extend([after, here])
            i += 2
            continue
        out.append(here)
        i += 1
    out = [MaxPool2x2() if _is_plain_2x2_pool(module) else module for module in out]
    for key in list(seq._modules):
        del seq._modules[key]
    for index, module in enumerate(out):
        seq.add_module(str(index), module)


def _optimise_block(block: BasicBlock) -> None:
    """``BasicBlock.forward`` applies bn1(conv1(x)) and bn2(conv2(x)): fold both pairs."""
    for conv_name, bn_name in (("conv1", "bn1"), ("conv2", "bn2")):
        folded = _fold(getattr(block, conv_name), getattr(block, bn_name))
        if folded is not None:
            setattr(block, conv_name, folded)
            setattr(block, bn_name, nn.Identity())


def has_conv(model: nn.Module) -> bool:
    """True when ``model`` has a Conv2d: then NHWC (channels_last) is the layout its kernels run fastest in."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


@torch.no_grad()
def inference_copy(model: nn.Module, *, channels_last: bool | None = None) -> nn.Module:
    """An eval-mode deep copy of ``model`` with BatchNorm folded (see the module docstring).

    ``channels_last`` defaults to "the model has a Conv2d". Only structures
    whose forward order is known are rewritten (``nn.Sequential`` children,
    ``BasicBlock``); anything else is copied unchanged.
    """
    net = copy.deepcopy(model).eval()
    for module in list(net.modules()):
        if isinstance(module, nn.Sequential):
            _optimise_sequential(module)
        elif isinstance(module, BasicBlock):
            _optimise_block(module)
    for param in net.parameters():
        param.requires_grad_(False)
    if channels_last is None:
        channels_last = has_conv(net)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    return net


EVAL_BATCH_VALUES = 1 << 25  # input values in one evaluation batch at most (128 MB as float32: 303 images of 192x192 RGB)


@torch.inference_mode()
def evaluate_logits(
    model: nn.Module,
    images_uint8: torch.Tensor,
    *,
    mean: list[float] | tuple[float, ...],
    std: list[float] | tuple[float, ...],
    batch_size: int = 1000,
    device: str = "cpu",
    tta: str = "none",
) -> torch.Tensor:
    """Float32 logits (N x classes, on the CPU) for uint8 N x C x H x W images.

    Runs an inference copy of ``model`` (``inference_copy``: BatchNorm
    folded, channels_last, eval mode), so the caller's model is untouched.
    ``device`` is where the forward passes run (the model is expected there);
    on CUDA the split moves there once when it fits, on the CPU batches are
    sliced from it as it is (a mapped split is not copied whole).
    ``batch_size`` is capped at ``EVAL_BATCH_VALUES`` input values a batch,
    so a batch's activations do not grow with the image size (the evaluate
    stage's memory once grew with 192x192 RGB images scored 1,000 at a time:
    benchmarks/README.md); below the cap (up to ~100x100 RGB at 1,000 a
    batch) it is used as given.
    ``tta="flip"`` averages the probabilities of each image and its mirror
    image and returns their log (test-time augmentation; ``cross_entropy``
    and ``softmax`` read it like logits).
    """
    device = resolve_device(device)
    per_image = max(1, int(images_uint8[0].numel())) if images_uint8.shape[0] else 1
    batch_size = max(1, min(batch_size, EVAL_BATCH_VALUES // per_image))
    scale, shift = norm_constants(mean, std, device)
    channels_last = has_conv(model)
    net = inference_copy(model, channels_last=channels_last)
    images = on_device(images_uint8, device)
    pages = ResidentCap(images)  # a large mapped split: keep a budget of its pages mapped, not all
    out: torch.Tensor | None = None
    for start in range(0, images.shape[0], batch_size):
        x = images[start:start + batch_size].to(device, non_blocking=True)
        pages.read(x.shape[0])
        if channels_last:  # uint8 first: the float batch is born NHWC, no float copy
            x = x.contiguous(memory_format=torch.channels_last)
        x = normalize(x, scale, shift)
        with autocast(device):
            logits = net(x).float()
            if tta == "flip":
                probs = logits.softmax(1).add_(net(x.flip(3)).float().softmax(1)).mul_(0.5)
                logits = probs.clamp_min_(1e-12).log_()
        if out is None:
            out = torch.empty(images.shape[0], logits.shape[1], dtype=torch.float32)
        out[start:start + logits.shape[0]].copy_(logits)
    return out if out is not None else torch.zeros(0, 0)
