"""Classification metrics on logits: top-k, per-class, confusion.

Computed with torch on whole tensors (no per-sample Python).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from cnnpipe.errors import CnnpipeError


def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: Iterable[int] = (1, 5)) -> dict[int, float]:
    """Share of samples whose label is among the ``k`` highest logits, per ``k``."""
    ks = list(ks)
    num_classes = logits.shape[1]
    for k in ks:
        if k < 1 or k > num_classes:
            raise CnnpipeError(f"top-{k} accuracy needs 1 <= k <= {num_classes} (the number of classes); lower eval.top_k")
    if labels.numel() == 0:
        return {k: 0.0 for k in ks}
    top = logits.topk(max(ks), dim=1).indices
    hits = top.eq(labels.view(-1, 1))
    return {k: float(hits[:, :k].any(dim=1).float().mean()) for k in ks}
