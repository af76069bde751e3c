"""Early stopping on a validation metric, with the best weights kept.

``patience`` counts epochs without improvement: with patience 3 the run
stops after the 3rd epoch in a row that did not beat the best by more than
``min_delta`` (patience 0: at the first such epoch). The best epoch's
weights are copied (on the training device) whenever the metric improves,
and restored at the end, so the returned model is the best one seen.

``fixed``: state-dict keys the run never changes (``engine.finetune.fixed_keys``:
a body frozen for the whole run). They are neither copied nor restored: the
model holds the same values at the end as at every improvement, so the copy
is the head alone, not the whole network.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class EarlyStopping:
    def __init__(self, monitor: str, patience: int, min_delta: float = 0.0,
                 fixed: frozenset[str] = frozenset()) -> None:
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
        self.fixed = frozenset(fixed)

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
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in self.fixed}
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.best_epoch is not None and self.bad_epochs >= self.patience and self.bad_epochs > 0

    def restore(self, model: torch.nn.Module) -> None:
        if self.best_state is not None:
            load_partial(model, self.best_state, self.fixed, "the best weights")

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "best_state": {k: v.cpu() for k, v in (self.best_state or {}).items()},
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str) -> None:
        """A saved ``state_dict``; its best weights hold the keys this run's ``fixed`` leaves out, or all of them."""
        self.best_value = float(state["best_value"])
        self.best_epoch = state["best_epoch"]
        self.bad_epochs = int(state["bad_epochs"])
        best = state.get("best_state") or {}
        self.best_state = {k: v.to(device) for k, v in best.items()} or None


def load_partial(model: torch.nn.Module, state: dict[str, torch.Tensor], fixed: frozenset[str], what: str) -> None:
    """Load ``state`` into ``model``: every key of the model but (some of) ``fixed``, and no other key.

    The keys left out keep the model's values (the run never changes them).
    A state missing any other key, or holding a key the model lacks, is
    refused (``ValueError``, naming the first keys) before anything is loaded.
    """
    own = model.state_dict()
    missing = [key for key in own if key not in state and key not in fixed]
    unexpected = [key for key in state if key not in own]
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else [])
        raise ValueError(f"{what} do not fit the model ({'; '.join(parts)})")
    model.load_state_dict(state, strict=len(state) == len(own))
