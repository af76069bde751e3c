"""Exponential moving average of the weights (training key ``ema``: 0 = off, e.g. 0.999 = on).

The average of the last ~1/(1-decay) optimizer steps generalises better than
the last step's weights, most of all late in a run with a high learning
rate, for no extra forward or backward passes. With ``ema`` on, the engine
validates, early-stops and checkpoints the averaged model, so what is
selected is what is published.

Built on ``torch.optim.swa_utils.AveragedModel`` (buffers averaged too, so
BatchNorm statistics match the averaged weights), with the usual warm-up:
the decay used at update ``n`` is ``min(decay, (1 + n) / (10 + n))``, so the
average is not dominated by the random initial weights in short runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def _ema_update(decay: float):
    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: Any) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        floats = [(a, c) for a, c in zip(averaged, current) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [c for _, c in floats], weight)
        for a, c in zip(averaged, current):  # integer buffers (num_batches_tracked): take the latest
            if not a.is_floating_point():
                a.copy_(c)
    return update


class WeightEMA:
    """The averaged copy of ``model``, updated after every optimizer step (a step post-hook)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, decay: float) -> None:
        self.averaged = AveragedModel(model, multi_avg_fn=_ema_update(decay), use_buffers=True)
        self.averaged.requires_grad_(False)
        self._model = model
        self._hook = optimizer.register_step_post_hook(lambda *_: self.averaged.update_parameters(self._model))

    @property
    def module(self) -> nn.Module:
        """The averaged network (same structure and state_dict keys as the trained one)."""
        return self.averaged.module

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu() for k, v in self.averaged.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.averaged.load_state_dict(state)


def make_ema(model: nn.Module, optimizer: torch.optim.Optimizer, decay: float) -> WeightEMA | None:
    """A ``WeightEMA`` when ``decay > 0``, else None (the key's default, 0.0, is off)."""
    return WeightEMA(model, optimizer, decay) if decay > 0 else None
