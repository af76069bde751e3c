"""Early stopping on a validation metric, with the best weights kept.

``patience`` counts epochs without improvement: with patience 3 the run
stops after the 3rd epoch in a row that did not beat the best by more than
``min_delta`` (patience 0: at the first such epoch). The best epoch's
weights are copied (on the training device) whenever the metric improves,
and restored at the end, so the returned model is the best one seen.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class EarlyStopping:
    def __init__(self, monitor: str, patience: int, min_delta: float = 0.0) -> None:
        if monitor not in ("val_loss", "val_top1"):
            raise ValueError(f"monitor must be val_loss or val_top1, got {monitor!r}")
        self.monitor = monitor
        self.patience = int(patience)
        self.min_delta = float(min_delta)
        self.lower_is_better = monitor == "val_loss"
        self.best_value = math.inf if self.lower_is_better else -math.inf
        self.best_epoch: int | None = None
        self.bad_epochs = 0
        self.best_state: dict[str, torch.Tensor] | None = None

    def improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.lower_is_better:
            return value < self.best_value - self.min_delta
        return value > self.best_value + self.min_delta

    def update(self, value: float, epoch: int, model: torch.nn.Module) -> bool:
        """Record ``value`` for ``epoch``; snapshot the weights if it improved. True if improved."""
        if self.improved(value):
            self.best_value = float(value)
            self.best_epoch = epoch
            self.bad_epochs = 0
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.best_epoch is not None and self.bad_epochs >= self.patience and self.bad_epochs > 0

    def restore(self, model: torch.nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "best_state": {k: v.cpu() for k, v in (self.best_state or {}).items()},
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str) -> None:
        self.best_value = float(state["best_value"])
        self.best_epoch = state["best_epoch"]
        self.bad_epochs = int(state["bad_epochs"])
        best = state.get("best_state") or {}
        self.best_state = {k: v.to(device) for k, v in best.items()} or None
