"""Pretrained weights as a pinned input: fetched once by the ``weights`` stage, verified every time they are read.

The ``weights`` stage. ``pretrained.weights`` names where a torchvision model's starting weights
come from:

* a torchvision weights name (``IMAGENET1K_V1``; ``DEFAULT`` is resolved):
  looked up where torchvision caches it,
  ``$TORCH_HOME/hub/checkpoints/<file name of weights.url>``
  (``torch.hub.get_dir()``), and downloaded there (plain urllib, progress,
  retries, the file name's hash prefix checked) when absent;
* a local file or an http(s) URL of a state dict (safetensors, or a torch
  file), pinned by ``pretrained.sha256``;
* a cnnpipe checkpoint: a folder like another project's ``models/best``, or
  a ``models:/name@alias`` registry URI (continue from your own model).

Nothing is ever unpickled: torch files are read with
``torch.load(weights_only=True)`` (torchvision's own
``load_state_dict_from_url`` does not pass it). The stage writes, as one
atomic folder (a DVC output, so ``dvc.lock`` pins it and ``dvc push/pull``
carry it), ``data/weights/<arch>.safetensors`` (the body's state dict: the
source's classifier is dropped) and ``manifest.json`` (per architecture: the
weights' name, source, SHA-256 of the source file, SHA-256 of the converted
file, and their normalization). The train stage reads only that folder,
never the network (``cnnpipe.models.pinned_weights``).

Every problem (offline with no file, a wrong SHA-256, a truncated file, a
pickle that would run code, weights of another architecture) is one
``CnnpipeError`` line, and nothing is written.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from cnnpipe.models import torchvision_spec as tvs
from cnnpipe.models.pinned_weights import FORMAT, MANIFEST, WEIGHTS_DIR
from cnnpipe.util.errors import CheckpointError, DataError
from cnnpipe.util.files import atomic_dir, atomic_path
from cnnpipe.util.hashing import sha256_file
from cnnpipe.models.checkpoint import WEIGHTS_FILE, read_sidecar
from cnnpipe.models.weights_file import check_weights_file, fit_problem
from cnnpipe.tracking.model_registry import download_checkpoint
from cnnpipe.util.transfer import Rejected as _Rejected, Transient as _Transient, fetch_http as _fetch_http

if TYPE_CHECKING:
    import torch

    from cnnpipe.params.schema import Params

_HASH_PREFIX = re.compile(r"-([a-f0-9]+)\.")  # torch.hub's convention: resnet18-f37072fd.pth

source_kind = tvs.source_kind


def needed_architectures(params: "Params") -> list[str]:
    """The torchvision architectures of the search that start from pretrained weights (in order, once each)."""
    from cnnpipe.params.axes import _candidates

    if params.pretrained.weights == tvs.NO_WEIGHTS:
        return []
    out: list[str] = []
    for name in _candidates(params.model):
        if tvs.is_name(name) and tvs.arch_of(name) not in out:
            out.append(tvs.arch_of(name))
    return out


# --------------------------------------------------------------------------- reading a state dict safely


def read_state_dict(path: Path, what: str) -> dict[str, "torch.Tensor"]:
    """A state dict from safetensors or a torch file (``weights_only=True``); one line for anything else."""
    import pickle
    import zipfile

    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    with open(path, "rb") as handle:
        head = handle.read(16)
    size = path.stat().st_size
    if head[:2] == b"PK" or head[:1] == b"\x80":  # a torch zip file or a legacy pickle
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            first = str(err).strip().splitlines()
            detail = next((line.strip() for line in first if "Unsupported" in line or "global" in line.lower()), "")
            raise CheckpointError(f"{what}: {path} is a pickle that would run code or build objects other than "
                                  f"tensors{f' ({detail})' if detail else ''}; refused (cnnpipe loads weights_only): "
                                  "convert it to safetensors or a plain state dict") from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
            raise CheckpointError(f"{what}: {path} is truncated or corrupt ({size} bytes: "
                                  f"{str(err).splitlines()[0].split('. ')[0][:100]}); delete it and fetch it again") from None
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]  # a {"state_dict": ...} training checkpoint
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{what}: {path} holds a {type(state).__name__}, not a state dict of tensors; "
                                  "save model.state_dict() instead")
        return {str(k): v for k, v in state.items()}

    try:
        check_weights_file(path, None)
        return load_file(str(path))
    except CheckpointError as err:
        text = str(err)
        reason = "truncated" if "truncated" in text else "not a safetensors or torch file"
        raise CheckpointError(f"{what}: {path} is {reason} ({size} bytes); delete it and fetch it again") from None
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{what}: {path} is unreadable ({err}); delete it and fetch it again") from None


# --------------------------------------------------------------------------- fetching


def torchvision_cache_path(url: str) -> Path:
    """Where torchvision looks for (and caches) the weights at ``url``: ``<torch.hub.get_dir()>/checkpoints/<name>``."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def download(url: str, dest: Path, *, what: str, timeout: float, retries: int, progress: bool = True,
             hash_prefix: str | None = None) -> None:
    """``url`` -> ``dest`` (atomic), retrying network errors; ``hash_prefix`` checks torch.hub's file-name hash."""
    problem = ""
    for attempt in range(retries + 1):
        try:
            with atomic_path(dest) as tmp, open(tmp, "wb") as out:
                _fetch_http(url, out, dest.name, timeout, progress)
                out.flush()
                if hash_prefix is not None:
                    digest = sha256_file(tmp)
                    if not digest.startswith(hash_prefix):
                        raise _Rejected(f"SHA-256 {digest[:12]}... does not start with the file name's {hash_prefix}")
            return
        except _Transient as err:
            problem = str(err)
            if attempt < retries:
                time.sleep(min(2.0 ** attempt, 8.0))
        except _Rejected as err:
            raise DataError(f"{what}: download from {url} refused ({err}); nothing was written") from None
    raise DataError(f"{what}: not found at {dest} and the download from {url} failed ({problem}); offline? "
                    f"place the file at {dest} (or set TORCH_HOME to a folder with hub/checkpoints/{dest.name}) "
                    "and run dvc repro weights again")


def _locate(arch: str, params: "Params", scratch: Path, progress: bool) -> tuple[Path, dict[str, Any]]:
    """The local file (or checkpoint folder) of the weights and what the manifest says of their origin."""
    settings = params.pretrained
    weights = settings.weights
    kind = source_kind(weights)
    timeout, retries = params.data.download.timeout, params.data.download.retries
    if kind == "torchvision":
        try:
            member = tvs.resolve_weights_name(arch, weights)
        except ValueError as err:
            raise DataError(str(err)) from None
        path = torchvision_cache_path(member.url)
        what = f"torchvision:{arch} weights {member.name}"
        if not path.is_file():
            match = _HASH_PREFIX.search(path.name)
            print(f"weights: downloading {what} from {member.url} to {path}", file=sys.stderr, flush=True)
            path.parent.mkdir(parents=True, exist_ok=True)
            download(member.url, path, what=what, timeout=timeout, retries=retries, progress=progress,
                     hash_prefix=match.group(1) if match else None)
        return path, {"weights": member.name, "source": member.url}
    if kind == "url":
        path = torchvision_cache_path(weights)
        what = f"pretrained.weights {weights}"
        if not (path.is_file() and settings.sha256 and sha256_file(path) == settings.sha256):
            path.parent.mkdir(parents=True, exist_ok=True)
            download(weights, path, what=what, timeout=timeout, retries=retries, progress=progress)
        return path, {"weights": tvs.CUSTOM, "source": weights}
    if kind == "registry":
        from cnnpipe.tracking.connection import make_client, resolve_store

        store = resolve_store(params.mlflow)
        folder = download_checkpoint(make_client(store.uri), weights, store.uri, scratch)
        return folder, {"weights": tvs.CUSTOM, "source": weights}
    path = Path(weights)
    if kind == "file" and not path.is_file():
        raise DataError(f"pretrained.weights: no file {weights!r} (looked at {path.resolve()}); put the state dict "
                        "there (dvc add it), or fix the path")
    return path, {"weights": tvs.CUSTOM, "source": str(weights)}


def _checkpoint_state(folder: Path, arch: str) -> tuple[dict[str, "torch.Tensor"], Path, dict[str, Any]]:
    """A cnnpipe checkpoint's body weights (``body.*`` keys), its weights file and its sidecar."""
    from safetensors.torch import load_file

    sidecar = read_sidecar(folder)
    check_weights_file(folder / WEIGHTS_FILE, sidecar["weights_sha256"])
    spec = tvs.spec_of(sidecar["layers"])
    if spec is None or spec["torchvision"] != arch:
        found = f"torchvision:{spec['torchvision']}" if spec else f"model {sidecar.get('model', '?')} (a cnnpipe layer list)"
        raise CheckpointError(f"pretrained.weights {folder} holds {found}, not torchvision:{arch}; its weights do not "
                              "fit the architecture: continue from a checkpoint of the same torchvision model")
    state = load_file(str(folder / WEIGHTS_FILE))
    body = {key[len("body."):]: value for key, value in state.items() if key.startswith("body.")}
    return body, folder / WEIGHTS_FILE, sidecar


def fetch_one(arch: str, params: "Params", scratch: Path, progress: bool = True) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """(body state dict, manifest entry) of ``arch``'s pretrained weights, verified."""
    from cnnpipe.models.torchvision_nets import bare_network

    located, entry = _locate(arch, params, scratch, progress)
    what = f"pretrained weights for torchvision:{arch}"
    sidecar = None
    if located.is_dir():
        state, file, sidecar = _checkpoint_state(located, arch)
    else:
        file = located
        state = None
    digest = sha256_file(file)
    pin = params.pretrained.sha256
    if pin is not None and digest != pin:
        raise DataError(f"{what} ({file}) have SHA-256 {digest}, not pretrained.sha256 {pin}; "
                        "the file changed or is another one: fix the pin or the file (nothing was written)")
    if state is None:
        state = read_state_dict(file, what)
    spec = tvs.layer_spec(arch, "none", 3)[0]
    import torch

    with torch.random.fork_rng(devices=[]):
        body, head_path, _ = bare_network(spec)
    expected = body.state_dict()
    if sidecar is None and any(key.startswith("body.") for key in state) and not any(k.startswith("body.") for k in expected):
        state = {key[len("body."):]: value for key, value in state.items() if key.startswith("body.")}  # a cnnpipe net's
    elif sidecar is None:  # a torchvision-layout state dict: its classifier is replaced, drop it
        state = {key: value for key, value in state.items()
                 if not (key.startswith(head_path + ".") and key not in expected)}
    problem = fit_problem(expected, state)
    if problem is not None:
        raise CheckpointError(f"{what} ({file}) do not fit the architecture ({problem}); they are for another "
                              "network (nothing was written)")
    if sidecar is not None:
        mean, std = _sidecar_normalization(sidecar)
    elif entry["weights"] != tvs.CUSTOM:
        mean, std = tvs.weights_normalization(tvs.resolve_weights_name(arch, entry["weights"]))
    else:
        mean, std = tvs.weights_normalization(tvs.reference_weights(arch))
    entry.update({"architecture": arch, "sha256": digest, "mean": mean, "std": std})
    return {key: value.contiguous() for key, value in state.items()}, entry


def _sidecar_normalization(sidecar: Mapping[str, Any]) -> tuple[list[float], list[float]]:
    """The normalization a cnnpipe checkpoint was trained with, per RGB channel (1 channel: replicated)."""
    spec = tvs.spec_of(sidecar["layers"]) or {}
    if "mean" in spec:
        return [float(v) for v in spec["mean"]], [float(v) for v in spec["std"]]
    mean, std = list(sidecar["mean"]), list(sidecar["std"])
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    return [float(v) for v in mean], [float(v) for v in std]


def fetch_weights(params: "Params", out_dir: str | os.PathLike[str] = WEIGHTS_DIR, *, progress: bool = True) -> dict[str, Any]:
    """Write ``out_dir`` (every needed architecture's weights + manifest) atomically; return the manifest."""
    from safetensors.torch import save_file

    archs = needed_architectures(params)
    manifest: dict[str, Any] = {"format": FORMAT, "weights": {}}
    with tempfile.TemporaryDirectory(prefix="cnnpipe-weights-") as scratch, atomic_dir(out_dir) as tmp:
        for arch in archs:
            state, entry = fetch_one(arch, params, Path(scratch), progress)
            file = f"{arch}.safetensors"
            save_file(state, str(tmp / file), metadata={"format": FORMAT, "architecture": arch})
            entry.update({"file": file, "file_sha256": sha256_file(tmp / file)})
            manifest["weights"][arch] = entry
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


