"""Fine-tuning strategies for a torchvision model: which parameters train at which epoch, at what rate.

Training keys (grid axes like any other):

* ``finetune: full``: everything trains at ``lr`` from the first epoch;
* ``finetune: head``: a linear probe: only the new head trains, the
  pretrained body stays frozen for the whole run;
* ``finetune: gradual``: fastai's ``fine_tune``: the head alone for
  ``freeze_epochs`` epochs, then everything, the body at
  ``lr * body_lr_mult`` (a discriminative learning rate), on the same
  schedule (``schedule`` runs over all epochs, both phases);
* ``bn_frozen``: while the body is frozen it runs in eval mode: its BatchNorm
  running statistics (the pretrained ones) do not drift toward the new
  data's, and its dropout is off, so a frozen body is a fixed function whose
  outputs can be cached (``store.features``).

The phase is a pure function of the epoch number (``frozen_at``), so a run
resumed after a kill mid-phase is in the same phase as one never stopped.
The optimizer's parameter groups are the same in every phase (head groups
first, then body groups, each split into decayed / not decayed): a frozen
parameter simply has ``requires_grad`` False and so no gradient, which every
torch optimizer skips (no update, no weight decay, no moment state), and its
group's learning rate is unused. So the optimizer state saved in one phase
loads into the other, and the schedule never jumps.

For cnnpipe layer lists (presets, ``models:``) nothing here applies: the
keys are inert and the optimizer gets the engine's usual groups.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from torch import nn

from cnnpipe.engine.optim import param_groups as plain_groups
from cnnpipe.models import torchvision_spec as tvs
from cnnpipe.models.cost import build_on_meta
from cnnpipe.models.torchvision_nets import TorchvisionNet
from cnnpipe.params.run_config import RunConfig
from cnnpipe.params.values import TrainingValues
from cnnpipe.models.pinned_weights import read_manifest


def body_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(body, head) of a built torchvision net: ``head(body(x)) == model(x)`` for normalized images ``x``.

    The body includes the input channel adapter; both share the model's
    modules (no copy). A frozen body's outputs are features that can be
    computed once and reused by any head.
    """
    if not isinstance(model, TorchvisionNet):
        raise TypeError(f"only a torchvision model has a pretrained body, got {type(model).__name__}")
    return nn.Sequential(model.adapter, model.body), model.head


def frozen_at(values: TrainingValues, epoch: int) -> bool:
    """Whether the body is frozen during ``epoch`` (1-based)."""
    if values.finetune == "head":
        return True
    if values.finetune == "gradual":
        return epoch <= values.freeze_epochs
    return False


def body_lr_mult(values: TrainingValues) -> float:
    """The body's learning rate as a multiple of ``lr`` once it trains (only ``gradual`` lowers it)."""
    return values.body_lr_mult if values.finetune == "gradual" else 1.0


def param_groups(model: nn.Module, values: TrainingValues) -> list[dict[str, Any]]:
    """The optimizer's groups: the engine's usual ones, or head then body groups for a torchvision net."""
    if not isinstance(model, TorchvisionNet):
        return plain_groups(model, values.weight_decay)
    groups = []
    for role, module, lr in (("head", model.head, values.lr), ("body", model.body, values.lr * body_lr_mult(values))):
        for group in plain_groups(module, values.weight_decay):
            if group["params"]:
                groups.append({**group, "lr": lr, "role": role})
    return groups


def set_phase(model: nn.Module, values: TrainingValues, epoch: int) -> bool:
    """Freeze or unfreeze the body for ``epoch`` (after ``model.train()``); returns whether it is frozen."""
    if not isinstance(model, TorchvisionNet):
        return False
    frozen = frozen_at(values, epoch)
    model.body.requires_grad_(not frozen)
    if frozen and values.bn_frozen:
        model.body.eval()  # a fixed feature extractor: BatchNorm statistics and dropout as in inference
    return frozen


def fixed_keys(model: nn.Module, values: TrainingValues) -> frozenset[str]:
    """State-dict keys of ``model`` that no epoch of the run can change: what a run state need not store.

    Only ``finetune: head`` freezes the body in every epoch, whatever
    ``epochs`` is (``gradual`` trains it once ``freeze_epochs`` are over): its
    parameters never get a gradient, so no optimizer touches them, and with
    ``bn_frozen`` the body runs in eval mode, so its buffers (BatchNorm
    statistics) stay too. Those tensors stay what the model was built with:
    the pinned pretrained weights (whose SHA-256 the run's identity holds),
    or the seeded initialisation. Empty for every other run (and for cnnpipe
    layer lists): everything can change.
    """
    if not isinstance(model, TorchvisionNet) or values.finetune != "head":
        return frozenset()
    keys = {f"body.{name}" for name, _ in model.body.named_parameters()}
    if values.bn_frozen:
        keys |= {f"body.{name}" for name in model.body.state_dict() if f"body.{name}" not in keys}
    return frozenset(keys & set(model.state_dict()))


def parameter_counts(model: nn.Module, values: TrainingValues) -> dict[str, int]:
    """Total parameters and those trained in each phase (for MLflow): ``params_total``, ``params_trainable[_frozen]``."""
    return _phase_counts(model, values.finetune)


def _phase_counts(model: nn.Module, finetune: str) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    if not isinstance(model, TorchvisionNet):
        return {"params_total": total, "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    head = sum(p.numel() for p in model.head.parameters())
    out = {"params_total": total}
    if finetune in ("head", "gradual"):
        out["params_trainable_frozen"] = head
    if finetune in ("full", "gradual"):
        out["params_trainable"] = total
    return out


@lru_cache(maxsize=64)
def _counts(spec_json: str, in_shape: tuple[int, ...], num_classes: int, finetune: str) -> dict[str, int]:
    """``parameter_counts`` of the spec's network, built on the meta device (shapes only: no values, no RNG draws).

    Keyed by what the counts depend on (not ``lr``, the seed, ...), so a grid
    over anything but the architecture or ``finetune`` builds it once.
    """
    return _phase_counts(build_on_meta([json.loads(spec_json)], in_shape, num_classes), finetune)


def tracking_fields(cfg: RunConfig, in_shape: tuple[int, ...], num_classes: int) -> tuple[dict[str, Any], dict[str, str]]:
    """(MLflow params, MLflow tags) describing a torchvision run's starting weights and trained parameters.

    Params: the weights' name and the parameter counts (total, trainable in
    each phase); tags: the weights' source (URL, file or checkpoint) and
    SHA-256 as the manifest of ``data/weights`` records them. Empty for
    cnnpipe layer lists.
    """
    spec = tvs.spec_of(cfg.layers)
    if spec is None:
        return {}, {}
    params: dict[str, Any] = {"pretrained_weights": spec["weights"]}
    params.update(_counts(json.dumps(spec, sort_keys=True), tuple(int(d) for d in in_shape), int(num_classes),
                          cfg.values.finetune))
    tags: dict[str, str] = {}
    if tvs.is_pretrained(spec) and spec.get("weights_sha256"):
        tags["pretrained.sha256"] = str(spec["weights_sha256"])
        if cfg.weights_dir is not None:
            entry = read_manifest(cfg.weights_dir)["weights"].get(spec["torchvision"], {})
            tags["pretrained.source"] = str(entry.get("source", ""))
    return params, tags
