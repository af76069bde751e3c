"""The pinned pretrained weights in ``data/weights/``, as the train side reads them: looked up, pinned, re-verified.

The ``weights`` stage (``cnnpipe.pretrained.fetch``) writes the folder:
``<arch>.safetensors`` (a body's state dict) and ``manifest.json`` (per
architecture: the weights' name, source, SHA-256 of the source file and of
the converted file, and their normalization). Here ``pin_layers`` copies a
manifest entry's SHA-256 and normalization into a run's layer spec, and
``load_pinned`` re-verifies the file before a run loads it; the train stage
never touches the network.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.models import torchvision_spec as tvs
from cnnpipe.util.errors import CheckpointError, CnnpipeError, DataError
from cnnpipe.models.weights_file import check_weights_file

if TYPE_CHECKING:
    import torch

WEIGHTS_DIR = Path("data/weights")
MANIFEST = "manifest.json"
FORMAT = "cnnpipe-weights/1"
# A file modified less than this long ago is checked every time: file times tick coarsely (a kernel tick, or
# seconds on some filesystems), so a file rewritten within one tick of its check could keep size and times.
_SETTLED_NS = 2_000_000_000
_verified: set[tuple[Any, ...]] = set()  # files checked in this process: (path, file SHA-256, stat fields)


def read_manifest(weights_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(weights_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} is missing; fetch the pretrained weights first: dvc repro weights") from None
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is unreadable ({type(err).__name__}); run dvc repro weights again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a cnnpipe weights manifest; run dvc repro weights again")
    return manifest


def _entry(spec: Mapping[str, Any], weights_dir: str | os.PathLike[str]) -> dict[str, Any]:
    arch = spec["torchvision"]
    entry = read_manifest(weights_dir)["weights"].get(arch)
    if entry is None or entry.get("weights") != spec["weights"]:
        held = f"holds {entry.get('weights')}" if entry else "has none"
        raise DataError(f"{Path(weights_dir)} {held} for torchvision:{arch}, the run needs {spec['weights']}; "
                        "fetch them: dvc repro weights")
    return entry


def pin_layers(layers: Sequence[Any], weights_dir: str | os.PathLike[str]) -> tuple[Any, ...]:
    """``layers`` with a pretrained torchvision spec pinned: the weights' SHA-256 and normalization added."""
    spec = tvs.spec_of(layers)
    if spec is None or not tvs.is_pretrained(spec):
        return tuple(layers)
    entry = _entry(spec, weights_dir)
    return ({**spec, "weights_sha256": entry["sha256"], "mean": list(entry["mean"]), "std": list(entry["std"])},)


def load_pinned(spec: Mapping[str, Any], weights_dir: str | os.PathLike[str]) -> dict[str, "torch.Tensor"]:
    """The body state dict a pinned spec names, re-verified against the manifest (SHA-256 of both files)."""
    from safetensors.torch import load_file

    arch = spec["torchvision"]
    if not spec.get("weights_sha256"):
        raise CnnpipeError(f"torchvision:{arch}: the run's pretrained weights are not pinned (no weights_sha256); "
                           "the train stage pins them from data/weights (dvc repro)")
    entry = _entry(spec, weights_dir)
    if entry["sha256"] != spec["weights_sha256"]:
        raise DataError(f"{Path(weights_dir)} holds other weights for torchvision:{arch} (SHA-256 {entry['sha256'][:12]}...) "
                        f"than the run was pinned to ({spec['weights_sha256'][:12]}...); run dvc repro")
    path = Path(weights_dir) / entry["file"]
    seen = _file_key(path, entry["file_sha256"])
    if seen is None or seen not in _verified:
        try:
            check_weights_file(path, entry["file_sha256"])
        except CheckpointError as err:
            raise DataError(f"{err}".replace("re-run the train stage", "run dvc repro weights")) from None
        if seen is not None and seen == _file_key(path, entry["file_sha256"]):  # not changed while it was read
            _verified.add(seen)
    return load_file(str(path))


def _file_key(path: Path, sha256: str) -> tuple[Any, ...] | None:
    """What must stay the same for a file checked once in this process to need no second SHA-256 pass.

    The path, the SHA-256 it was checked against, and its size, mtime_ns,
    ctime_ns, inode and device (a file replaced by a rename has another
    inode; one written in place, another size or times). None for a file
    modified in the last two seconds (see ``_SETTLED_NS``): that one is
    always checked again.
    """
    try:
        st = path.stat()
    except OSError:
        return None
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < _SETTLED_NS:
        return None
    return (str(path.resolve()), sha256, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
