"""Optimizer and per-step learning-rate schedule from the training values.

Weight decay is applied to weight matrices and conv kernels only, never to
biases or BatchNorm scales/shifts (1-D parameters): decaying those only
fights normalization and is the standard exclusion in ResNet/ViT recipes.
Schedules step once per optimizer step, so they behave the same for any
batch size: ``cosine`` anneals ``lr`` to 0 over all steps of ``epochs``;
``onecycle`` warms up from ``lr/25`` to ``lr`` over the first 25 % of steps
and anneals (cosine) to ``lr/1e4``. Momentum is not cycled: ``momentum`` /
Adam's betas mean what params.yaml says.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnnpipe.params.values import TrainingValues

ONECYCLE_PCT_START = 0.25


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, values: TrainingValues,
                    groups: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
    """adam | adamw | sgd (momentum, nesterov) with ``values.lr`` and ``values.weight_decay``.

    Fused kernels (one per step, CPU and CUDA): less time per step than
    ``foreach`` for the tutorial net on the CPU (figure in benchmarks/README.md).
    ``groups`` (default: ``param_groups``) may set a learning rate per group
    (``engine.finetune``: a torchvision body's lower rate).
    """
    groups = groups if groups is not None else param_groups(model, values.weight_decay)
    if values.optimizer == "adam":
        return torch.optim.Adam(groups, lr=values.lr, fused=True)
    if values.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=values.lr, fused=True)
    if values.optimizer == "sgd":
        nesterov = bool(values.nesterov and values.momentum > 0)
        return torch.optim.SGD(groups, lr=values.lr, momentum=values.momentum, nesterov=nesterov, fused=True)
    raise ValueError(f"unknown optimizer {values.optimizer!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, values: TrainingValues, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-step schedule over ``total_steps`` (= epochs x steps per epoch); None for 'none'."""
    if values.schedule == "none":
        return None
    if values.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps), eta_min=0.0)
    if values.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],  # each group's own peak (all lr for presets)
            total_steps=max(2, total_steps),
            pct_start=ONECYCLE_PCT_START,
            anneal_strategy="cos",
            cycle_momentum=False,
        )
    raise ValueError(f"unknown schedule {values.schedule!r}")


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])
