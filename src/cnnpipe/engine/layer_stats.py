"""Per-layer weight and gradient norms for each epoch's record (``train_run(layer_stats=True)``).

What an ``EpochRecord`` carries as ``weight_norm/<module>`` and
``grad_norm/<module>``, so a layer whose gradients vanish or explode can be
told from the rest. The gradient norm is the mean over the epoch's steps,
accumulated on the device: reading a norm back to the host every step would
stall a GPU, so the only host sync is one per epoch, in ``collect``.
"""

from __future__ import annotations

import torch
from torch import nn


def _stat_modules(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """Modules owning trainable parameters directly, by module path (``0``, ``4.conv1``).

    Direct ownership only (``recurse=False``): a container's norm would count
    its children's parameters again. A frozen parameter has no gradient to
    report, so it is left out.
    """
    out = []
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and name:
            out.append((name, own))
    return out


class LayerStats:
    """Per-module weight norms and epoch-mean gradient norms, without per-step host syncs."""

    def __init__(self, model: nn.Module, device: str) -> None:
        self.modules = _stat_modules(model)
        self.params = [p for _, ps in self.modules for p in ps]
        owner = [i for i, (_, ps) in enumerate(self.modules) for _ in ps]
        self.owner = torch.tensor(owner, dtype=torch.long, device=device)
        self.grad_sum = torch.zeros(len(self.modules), device=device)
        self.steps = 0

    def _module_norms(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One L2 norm per module over all its tensors: per-tensor norms in one fused call, summed as squares."""
        norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)])
        sq = torch.zeros(len(self.modules), device=norms.device).index_add_(0, self.owner, norms.square())
        return sq.sqrt()

    def after_backward(self) -> None:
        """Add this step's gradient norms to the epoch's sum (on the device: no sync).

        A parameter that got no gradient this step (unused in the forward
        pass) counts as a zero gradient rather than being skipped, so the
        tensor list keeps the layout ``owner`` indexes.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self.grad_sum += self._module_norms(grads)
        self.steps += 1

    def collect(self) -> dict[str, float]:
        """The epoch's ``weight_norm/<module>`` (now) and ``grad_norm/<module>`` (mean over its steps); resets the sum."""
        with torch.no_grad():
            weights = self._module_norms([p.detach() for p in self.params]).tolist()
        grads = (self.grad_sum / max(1, self.steps)).tolist()
        out: dict[str, float] = {}
        for (name, _), w, g in zip(self.modules, weights, grads):
            out[f"weight_norm/{name}"] = float(w)
            out[f"grad_norm/{name}"] = float(g)
        self.grad_sum.zero_()
        self.steps = 0
        return out
