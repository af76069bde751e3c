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
    """Per-module weight norms and epoch-mean gradient norms, without per-step host syncs.

    What is not computed: a parameter without a gradient (a frozen body's)
    adds nothing to its module's sum (as a zero gradient would: adding 0.0
    leaves the sum's bits as they are), and a frozen parameter's weight norm
    is the one computed at the last ``collect`` while it provably holds the
    same values (``_unchanged``). The logged values are those of computing
    everything.
    """

    def __init__(self, model: nn.Module, device: str) -> None:
        self.modules = _stat_modules(model)
        self.params = [p for _, ps in self.modules for p in ps]
        self.owners = [i for i, (_, ps) in enumerate(self.modules) for _ in ps]
        self.owner = torch.tensor(self.owners, dtype=torch.long, device=device)
        self.device = device
        self.grad_sum = torch.zeros(len(self.modules), device=device)
        self.steps = 0
        self._subset: tuple[tuple[int, ...], torch.Tensor] | None = None  # (params with a gradient, their owners)
        self._weight_norms: list[tuple[tuple[object, ...], torch.Tensor, torch.Tensor] | None] = [None] * len(self.params)

    def _owner_of(self, present: tuple[int, ...]) -> torch.Tensor:
        """``owner`` for the parameters ``present`` (kept for the next step: a phase has one such set)."""
        if len(present) == len(self.params):
            return self.owner
        if self._subset is None or self._subset[0] != present:
            owners = torch.tensor([self.owners[i] for i in present], dtype=torch.long, device=self.device)
            self._subset = (present, owners)
        return self._subset[1]

    def _sum_norms(self, norms: list[torch.Tensor], owner: torch.Tensor) -> torch.Tensor:
        """One L2 norm per module over the given per-tensor norms (of the tensors ``owner`` assigns), summed as squares."""
        stacked = torch.stack([n.float() for n in norms])
        sq = torch.zeros(len(self.modules), device=stacked.device).index_add_(0, owner, stacked.square())
        return sq.sqrt()

    def after_backward(self) -> None:
        """Add this step's gradient norms to the epoch's sum (on the device: no sync).

        A parameter that got no gradient this step (frozen, or unused in the
        forward pass) counts as a zero gradient: it is left out of the sum
        (adding its 0.0 would not change a bit), without a tensor of zeros.
        """
        present = tuple(i for i, p in enumerate(self.params) if p.grad is not None)
        if present:
            grads = [self.params[i].grad for i in present]
            self.grad_sum += self._sum_norms(torch._foreach_norm(grads), self._owner_of(present))
        self.steps += 1

    def _weight_norm_list(self) -> list[torch.Tensor]:
        """Per-parameter weight norms; an unchanged parameter's from the previous call."""
        out: list[torch.Tensor | None] = [None] * len(self.params)
        stale = []
        for i, p in enumerate(self.params):
            kept = self._weight_norms[i]
            if kept is not None and _unchanged(p, kept[0]):
                out[i] = kept[2]
            else:
                stale.append(i)
        if stale:
            fresh = torch._foreach_norm([self.params[i].detach() for i in stale])
            for i, norm in zip(stale, fresh):
                p = self.params[i]
                out[i] = norm
                self._weight_norms[i] = (_identity(p), p.detach(), norm)  # p.detach(): holds the storage's address
        return out  # type: ignore[return-value]

    def collect(self) -> dict[str, float]:
        """The epoch's ``weight_norm/<module>`` (now) and ``grad_norm/<module>`` (mean over its steps); resets the sum."""
        with torch.no_grad():
            weights = self._sum_norms(self._weight_norm_list(), self.owner).tolist()
        grads = (self.grad_sum / max(1, self.steps)).tolist()
        out: dict[str, float] = {}
        for (name, _), w, g in zip(self.modules, weights, grads):
            out[f"weight_norm/{name}"] = float(w)
            out[f"grad_norm/{name}"] = float(g)
        self.grad_sum.zero_()
        self.steps = 0
        return out


def _identity(tensor: torch.Tensor) -> tuple[object, ...]:
    return (tensor.data_ptr(), tensor._version, tensor.dtype, tuple(tensor.shape))


def _unchanged(param: torch.Tensor, identity: tuple[object, ...]) -> bool:
    """Whether ``param`` still holds the values it had when its ``_identity`` was ``identity``.

    Only a frozen parameter qualifies: ``requires_grad`` False and no
    gradient, so no optimizer step wrote it (the engine's phases freeze a
    parameter for whole epochs, and one frozen at an epoch's end was frozen
    since: ``engine.finetune``). Then the same storage address (the memo
    holds the storage, so no other tensor can get the address meanwhile)
    and ``_version`` rule out ``copy_``/``load_state_dict`` and ``.to()``.
    ``_version`` alone would not do: fused optimizer steps (the engine's)
    write parameters in place without bumping it.
    """
    return not param.requires_grad and param.grad is None and _identity(param) == identity
