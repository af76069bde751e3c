"""Per-epoch run state: everything needed to continue a run bit-for-bit.

One file, ``<state_dir>/state.safetensors``, rewritten atomically after every
epoch: model, optimizer and scheduler states, the shuffling/augmentation
generator and torch's global RNG (dropout), the history so far and the
early-stopping state with its best weights. A run whose body is frozen for
the whole run (``engine.finetune.fixed_keys``: ``finetune: head``) leaves
the body's tensors out of the model and of the best weights: they are what
the model is built with (the pinned pretrained weights, whose SHA-256 the
state identity holds, re-verified by the build), so a resumed run gets them
from its build and the file holds only what can change (the head, its
optimizer state). ``run_state`` assembles it from
the loop's live objects, ``save_run_state`` writes it, and ``match_layouts``
makes a loaded optimizer state continue exactly like the uninterrupted run.
Tensors are stored as safetensors; everything else (nesting, numbers,
strings) is a JSON skeleton in the file's metadata, with each tensor replaced
by its name. Loading parses JSON and reads raw tensors: nothing is unpickled,
no code runs. A state is used only when its identity (``state_identity``) and
data fingerprint match the run being started; a truncated or foreign file is
refused with ``CheckpointError``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cnnpipe.compute.device import is_cuda
from cnnpipe.util.errors import CheckpointError
from cnnpipe.util.files import atomic_path
from cnnpipe.util.hashing import digest

if TYPE_CHECKING:
    from torch import nn

    from cnnpipe.engine.data import TrainData
    from cnnpipe.engine.early_stopping import EarlyStopping
    from cnnpipe.engine.records import EpochRecord
    from cnnpipe.params.run_config import RunConfig

STATE_FILE = "state.safetensors"
STATE_FORMAT = "cnnpipe-runstate/3"  # 3: a frozen body's tensors left out (``FixedTensors``)
_META_KEY = "cnnpipe"


def state_identity(cfg: "RunConfig") -> str:
    """What a saved state must match to be continued: the config, minus ``epochs`` when no schedule uses it.

    With ``schedule: none`` the first k epochs do not depend on ``epochs``
    (it only says where to stop), so a run trained to epoch 9 continues
    bit-for-bit when ``epochs`` is raised to 27. Cosine and one-cycle
    schedules are defined over ``epochs``: there it is part of the identity.
    """
    values = cfg.values.model_dump(mode="json")
    if values.get("schedule") == "none":
        values.pop("epochs", None)
    return digest({"values": values, "layers": list(cfg.layers), "dataset": cfg.dataset}, length=16)


def state_path(state_dir: str | os.PathLike[str]) -> Path:
    return Path(state_dir) / STATE_FILE


def _flatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``obj`` as JSON-able data, tensors moved into ``tensors`` and replaced by ``{"$t": name}``."""
    if isinstance(obj, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = obj.detach().cpu().contiguous()
        return {"$t": name}
    if isinstance(obj, dict):  # keys may be ints (optimizer state): keep their JSON type
        return {"$d": [[key, _flatten(value, tensors)] for key, value in obj.items()]}
    if isinstance(obj, tuple):
        return {"$tuple": [_flatten(value, tensors) for value in obj]}
    if isinstance(obj, list):
        return [_flatten(value, tensors) for value in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a run state")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(value, tensors) for value in obj]
    if isinstance(obj, dict):
        if "$t" in obj:
            return tensors[obj["$t"]]
        if "$tuple" in obj:
            return tuple(_unflatten(value, tensors) for value in obj["$tuple"])
        if "$d" in obj:
            return {key: _unflatten(value, tensors) for key, value in obj["$d"]}
        raise ValueError("unknown node in run state")
    return obj


def save_resume_state(state_dir: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` atomically (temp file, fsync, rename) and return its path."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten({"format": STATE_FORMAT, **state}, tensors)
    path = state_path(state_dir)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(skeleton)})
    return path


def read_state_header(state_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state's small fields (run id, epoch, stop reason) without its tensors; None if absent or unreadable."""
    try:
        state = load_resume_state(state_dir)
    except CheckpointError:
        return None
    if state is None:
        return None
    return {key: state.get(key) for key in ("identity", "data_fingerprint", "epoch", "stop_reason", "status")}


def load_resume_state(state_dir: str | os.PathLike[str], identity: str | None = None,
                      fingerprint: str | None = None) -> dict[str, Any] | None:
    """The saved state for this run and data, or None (absent, another run, other data).

    Raises ``CheckpointError`` (one line, with the fix) for a truncated,
    foreign or tampered file.
    """
    path = state_path(state_dir)
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as handle:
            meta = (handle.metadata() or {}).get(_META_KEY)
            for name in handle.keys():
                tensors[name] = handle.get_tensor(name)
        if meta is None:
            raise ValueError("no cnnpipe metadata")
        state = _unflatten(json.loads(meta), tensors)
    except Exception as err:  # safetensors raises its own errors for truncated/garbage files
        raise CheckpointError(f"{path}: unreadable run state ({type(err).__name__}); it was ignored and the run "
                              "starts afresh") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a cnnpipe run state; it was ignored and the run starts afresh")
    if (identity is not None and state.get("identity") != identity) or (
            fingerprint is not None and state.get("data_fingerprint") != fingerprint):
        return None
    return state


class FixedTensors:
    """The state-dict keys of a model that its run never changes, and a check that they did not.

    ``keys`` (``engine.finetune.fixed_keys``) are left out of every run state
    and early-stopping copy. ``check`` (at every save, and before the best
    weights are put back) refuses to go on when one could have changed: a
    parameter that trains or holds a gradient (what an optimizer step
    writes), a buffer whose module runs in training mode (BatchNorm
    statistics), or a tensor whose ``_version`` moved (``copy_``,
    ``load_state_dict``, BatchNorm's batch counter). A resumed run would then
    differ from an uninterrupted one: a loud error, not a silently different
    model.
    """

    def __init__(self, model: nn.Module, keys: frozenset[str]) -> None:
        self.keys = frozenset(keys)
        self._versions = self._now(model)
        self._params = [(name, p) for name, p in model.named_parameters() if name in self.keys]
        self._owners = [(name, module) for name, module in model.named_modules()
                        if any(f"{name}.{b}" in self.keys for b, _ in module.named_buffers(recurse=False))]

    def _now(self, model: nn.Module) -> dict[str, int]:
        if not self.keys:
            return {}
        return {key: t._version for key, t in model.state_dict(keep_vars=True).items() if key in self.keys}

    def check(self, model: nn.Module, *, trained: bool = True) -> None:
        """Raise ``RuntimeError`` if a fixed tensor could have changed (``trained``: an epoch just ran in
        this process, so the parameters and modules are in its phase; else only ``_version`` is compared)."""
        if not self.keys:
            return
        changed = sorted(key for key, version in self._now(model).items() if version != self._versions.get(key))
        if trained:
            changed += [f"{name} (trains)" for name, p in self._params if p.requires_grad or p.grad is not None]
            changed += [f"{name} (training mode)" for name, module in self._owners if module.training]
        if changed:
            raise RuntimeError(f"{', '.join(changed[:3])}: {len(changed)} tensor(s) of a body frozen for the whole run "
                               "could change; a run state without them would not resume exactly")


NO_FIXED: frozenset[str] = frozenset()


def run_state(cfg: RunConfig, data: TrainData, epoch: int, model: nn.Module, optimizer: torch.optim.Optimizer,
              scheduler: Any, generator: torch.Generator, dev: str, stopper: EarlyStopping,
              history: list[EpochRecord], seconds: float, train_images: int, train_seconds: float,
              stop_reason: str | None, status: str, ema: Any = None, diverged_model: bool = False,
              fixed: FixedTensors | None = None) -> dict[str, Any]:
    """Everything the training loop needs to continue after ``epoch``, as ``save_resume_state`` stores it.

    A diverged run's live weights are NaN and never trained further: only
    its history and best weights matter, so its model/optimizer are not kept.
    ``fixed``: the model's tensors the run never changes (checked, then left
    out; the early-stopping copy leaves them out itself). The EMA copy is
    kept whole: averaging a constant rewrites it in place (``-0.0`` may come
    back as ``0.0``), so its body is not provably the built one.
    """
    skip = NO_FIXED
    if fixed is not None and not diverged_model:
        fixed.check(model)
        skip = fixed.keys
    return {
        "identity": state_identity(cfg), "data_fingerprint": data.fingerprint, "epoch": epoch, "status": status,
        "model": None if diverged_model else {k: t.detach() for k, t in model.state_dict().items() if k not in skip},
        "optimizer": None if diverged_model else optimizer.state_dict(),
        "scheduler": None if diverged_model or scheduler is None else scheduler.state_dict(),
        "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(torch.device(dev)) if is_cuda(dev) else None,
        "early": stopper.state_dict(), "history": [r.to_dict() for r in history],
        "seconds": seconds, "train_images": train_images, "train_seconds": train_seconds, "stop_reason": stop_reason,
        "ema": None if diverged_model or ema is None else ema.state_dict(),
    }


def save_run_state(resume_dir: str | os.PathLike[str] | None, state: dict[str, Any] | None) -> None:
    """Save ``state`` when the run keeps one: a run started without ``resume_dir`` writes nothing."""
    if resume_dir is not None and state is not None:
        save_resume_state(resume_dir, state)


def match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give every loaded optimizer state tensor its parameter's strides.

    A saved state is contiguous, while a conv net's parameters (and so the
    grads and moment buffers of an uninterrupted run) are channels_last. The
    values are the same, but elementwise kernels take another path on mixed
    layouts and round differently: without this a resumed run drifts from an
    uninterrupted one in the last bits, and the drift grows over the epochs
    (the figure measured on ``small_bn`` is in benchmarks/README.md).
    """
    for group in optimizer.param_groups:
        for param in group["params"]:
            for key, value in optimizer.state.get(param, {}).items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    like = torch.empty_like(param, dtype=value.dtype)
                    like.copy_(value)
                    optimizer.state[param][key] = like
