"""A weights file checked before anything reads it, and a state dict checked against the network it is for.

``check_weights_file`` refuses anything but an intact safetensors file
(a pickle or zip planted under the name is detected by its magic bytes and
never opened); ``fit_problem`` names the first missing, unexpected or
misshapen key. Checkpoints (``models.checkpoint``), pinned pretrained
weights and torchvision bodies all go through these two.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.util.errors import CheckpointError
from cnnpipe.util.hashing import sha256_file

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "model.safetensors"  # a checkpoint folder's weights
SIDECAR_FILE = "model.json"  # ... and the sidecar that pins their SHA-256
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def _describe_foreign(head: bytes) -> str | None:
    """Name a known non-safetensors format from its first bytes (for the message only)."""
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle"
    if head[:4] == b"PK\x03\x04":
        return "a zip (torch.save) file"
    return None


def check_weights_file(path: Path, expected_sha256: str | None) -> None:
    """Refuse anything but an intact safetensors file, without parsing it as anything else.

    Layout checked: 8-byte little-endian header length, a JSON header that
    starts with ``{`` and fits in the file, and tensor data reaching the end
    the header promises. Only then is the hash compared (so the message says
    *what* is wrong, not just "hash mismatch").
    """
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; re-run the train stage (or dvc checkout models/best)")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
        (header_len,) = struct.unpack("<Q", head[:8]) if len(head) >= 8 else (0,)
        looks_safetensors = len(head) >= 8 and header_len <= _MAX_HEADER and (len(head) == 8 or head[8:9] == b"{")
        if not looks_safetensors:
            foreign = _describe_foreign(head)
            if foreign:
                raise CheckpointError(f"{path} is {foreign}, not safetensors; cnnpipe never unpickles weights: delete it and re-run the train stage")
            if len(head) < 8:
                raise CheckpointError(f"{path} is truncated ({size} bytes); re-run the train stage (or dvc checkout models/best)")
            raise CheckpointError(f"{path} is not a safetensors file; delete it and re-run the train stage")
        if 8 + header_len > size:
            raise CheckpointError(f"{path} is truncated ({size} bytes, its header alone needs {8 + header_len}); re-run the train stage (or dvc checkout models/best)")
        handle.seek(8)
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (unreadable header); delete it and re-run the train stage") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is not a safetensors file (bad header); delete it and re-run the train stage")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise CheckpointError(f"{path} is not a safetensors file (bad tensor table); delete it and re-run the train stage") from None
    if 8 + header_len + end > size:
        raise CheckpointError(f"{path} is truncated ({size} of {8 + header_len + end} bytes); re-run the train stage (or dvc checkout models/best)")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CheckpointError(f"{path} does not match weights_sha256 in {SIDECAR_FILE} (modified or swapped); re-run the train stage (or dvc checkout models/best)")


def fit_problem(expected: Mapping[str, "torch.Tensor"], state: Mapping[str, Any]) -> str | None:
    """Why ``state`` does not fit a module whose state dict is ``expected`` (first keys named), or None."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        return "; ".join(parts)
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            return f"{key} has shape {tuple(state[key].shape)}, the network needs {tuple(tensor.shape)}"
    return None


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
