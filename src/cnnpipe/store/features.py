"""Cached backbone features: a frozen pretrained body's outputs, computed once and reused by every head.

A linear probe (``finetune: head``) on a frozen body (``bn_frozen: true``:
the body runs in eval mode, BatchNorm statistics and dropout fixed) without
augmentation trains only the head on what the body outputs, and the body
gives every head of a grid, and every later experiment, the same outputs. So
the train and val splits go through the body once; the grid's heads train
on the stored feature vectors in seconds instead of minutes.

An entry is keyed by everything its numbers depend on: the resolved
torchvision spec (architecture, the weights' SHA-256, their normalization,
the input channels), the prepared data's fingerprint (so the image size and
the split too), the device kind, the torch version and the code that
computes them (``CODE_ENTRY``'s import closure, ``codegraph.code_identity``). It
is never served for other weights, data or code. Entries live under
``.cnnpipe-cache/features/<key>/`` (``features.safetensors`` + ``meta.json``),
written whole (temp folder, then rename) under a lock, so two grid workers
that need the same features compute them once; a damaged entry is computed
again. ``cnnpipe cache`` lists and prunes them; ``CNNPIPE_NO_CACHE=1``
recomputes (and stores the fresh ones); ``CNNPIPE_FEATURES=0`` trains through
the body instead (the same maths, the slow way: what the benchmark compares).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.codegraph.code_identity import code_identity
from cnnpipe.util.env import FEATURES, NO_CACHE, flag
from cnnpipe.util.files import atomic_dir
from cnnpipe.util.hashing import digest
from cnnpipe.util.locks import held
from cnnpipe.models.torchvision_spec import is_pretrained, spec_of
from cnnpipe.store.location import default_cache_dir

if TYPE_CHECKING:
    import torch
    from torch import nn

    from cnnpipe.engine.data import TrainData
    from cnnpipe.params.run_config import RunConfig

KIND = "features"
FORMAT = "cnnpipe-features/1"
FILE = "features.safetensors"
META = "meta.json"
BATCH = 256
CODE_ENTRY = "cnnpipe.store.features"  # the identity: this module's import closure (codegraph.code_identity)
SPLITS = ("train", "val")


def default_features_dir() -> Path:
    """Beside the run cache (``CNNPIPE_CACHE_DIR`` moves both)."""
    return default_cache_dir().parent / KIND


def applies(cfg: "RunConfig") -> bool:
    """Whether ``cfg`` trains a head on a body that never changes and sees the same images every epoch."""
    from cnnpipe.params.values import resolve_augment

    v = cfg.values
    return (is_pretrained(spec_of(cfg.layers)) and v.finetune == "head" and v.bn_frozen
            and resolve_augment(v.augment, cfg.dataset) == "none" and flag(FEATURES, default=True))


def features_key(cfg: "RunConfig", data_fingerprint: str, device: str, code: str | None = None) -> str:
    """The entry's name: spec (weights' SHA-256 included), data, device kind, torch and code identity."""
    from importlib.metadata import version

    return digest({"format": FORMAT, "spec": spec_of(cfg.layers), "data": data_fingerprint,
                   "device": device.split(":")[0], "torch": version("torch"),
                   "code": code or code_identity(CODE_ENTRY)})


@dataclass(frozen=True)
class Features:
    """The body's outputs for the train and val splits (float32, N x D, on the CPU)."""

    train: "torch.Tensor"
    val: "torch.Tensor"
    key: str
    reused: bool


def body_outputs(model: "nn.Module", images: "torch.Tensor", mean: list[float], std: list[float],
                 device: str) -> "torch.Tensor":
    """The features of uint8 ``images`` (N x C x H x W): normalized, through the eval-mode body, in batches."""
    import torch

    from cnnpipe.data.resident_pages import ResidentCap
    from cnnpipe.engine.augment import norm_constants, normalize

    scale, shift = norm_constants(mean, std, device)
    pages = ResidentCap(images)
    was_training = model.training
    model.eval()
    chunks = []
    try:
        with torch.inference_mode():
            for start in range(0, int(images.shape[0]), BATCH):
                x = normalize(images[start:start + BATCH].to(device), scale, shift)
                pages.read(int(x.shape[0]))
                chunks.append(model.features(x).float().cpu())
    finally:
        model.train(was_training)
    width = chunks[0].shape[1] if chunks else 0
    return torch.cat(chunks) if chunks else torch.zeros(0, width)


class FeatureCache:
    """Features by key under ``root``: ``get_or_compute`` is the one way in."""

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root) if root is not None else default_features_dir()

    def load(self, key: str, sizes: dict[str, int]) -> dict[str, "torch.Tensor"] | None:
        """The stored features of ``key`` when whole and of the expected sizes; None otherwise."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        entry = self.root / key
        try:
            meta = json.loads((entry / META).read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT or meta.get("key") != key:
                return None
            tensors = load_file(str(entry / FILE))
        except (OSError, ValueError, SafetensorError):
            return None
        if set(tensors) != set(SPLITS) or any(int(tensors[s].shape[0]) != sizes[s] for s in SPLITS):
            return None
        return tensors

    def store(self, key: str, tensors: dict[str, "torch.Tensor"], meta: dict[str, Any]) -> None:
        from safetensors.torch import save_file

        with atomic_dir(self.root / key) as tmp:
            save_file({name: t.contiguous() for name, t in tensors.items()}, str(tmp / FILE))
            (tmp / META).write_text(json.dumps({"format": FORMAT, "key": key, **meta}, indent=2) + "\n",
                                    encoding="utf-8")

    def get_or_compute(self, cfg: "RunConfig", data: "TrainData", model: "nn.Module", mean: list[float],
                       std: list[float], device: str) -> Features:
        """The features of ``data``'s train and val splits through ``model``'s body: stored ones, or computed and stored."""
        key = features_key(cfg, data.fingerprint, device)
        sizes = {"train": len(data.train), "val": len(data.val)}
        with held(self.root / ".locks" / key):  # a second worker waits for the first one's entry
            found = None if flag(NO_CACHE) else self.load(key, sizes)
            if found is not None:
                os.utime(self.root / key)  # last use: `cnnpipe cache --older-than` prunes unused entries first
                return Features(found["train"], found["val"], key, reused=True)
            tensors = {"train": body_outputs(model, data.train.images, mean, std, device),
                       "val": body_outputs(model, data.val.images, mean, std, device)}
            try:
                self.store(key, tensors, {"model": cfg.values.model, "data": data.fingerprint,
                                          "dim": int(tensors["train"].shape[1]), **sizes})
            except OSError as err:  # a full disk costs the next run a recomputation, never this one its features
                print(f"features: could not store {self.root / key} ({err.strerror or err}); computed again next time",
                      flush=True)
        return Features(tensors["train"], tensors["val"], key, reused=False)
