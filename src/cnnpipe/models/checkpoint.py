"""Model checkpoints: ``model.safetensors`` + a ``model.json`` sidecar.

The sidecar says everything needed to rebuild the network (layer spec,
input shape, class count) and to use it (classes, normalization, data
fingerprint, training params, metrics, MLflow ids), so ``load_checkpoint``
needs nothing but the folder. Weights are safetensors: plain tensors, no
code, and the sidecar pins their SHA-256.

Loading refuses, with one ``CheckpointError`` line naming the file and the
fix: a missing or foreign sidecar, a pickle or zip (``torch.save``) planted
as ``model.safetensors`` (detected by its magic bytes and *never* opened
with pickle), a truncated or corrupt weights file, a hash mismatch, an
unknown layer type, and missing/unexpected keys or shape mismatches.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe import __version__
from cnnpipe.util.errors import CheckpointError, CnnpipeError
from cnnpipe.util.files import atomic_dir, atomic_write_json
from cnnpipe.util.hashing import sha256_file
from cnnpipe.models.weights_file import SIDECAR_FILE, WEIGHTS_FILE, check_weights_file, fit_problem

if TYPE_CHECKING:
    from torch import nn

FORMAT = "cnnpipe-checkpoint/1"
REQUIRED = ("format", "layers", "in_shape", "num_classes", "weights_sha256")


@dataclass
class Checkpoint:
    model: "nn.Module"  # CPU, eval mode
    sidecar: dict[str, Any]

    @property
    def classes(self) -> list[str]:
        return list(self.sidecar.get("classes") or [])


def save_checkpoint(directory: str | os.PathLike[str], model: "nn.Module", sidecar: dict[str, Any]) -> dict[str, Any]:
    """Write the folder atomically (whole-folder swap) and return the sidecar as written.

    ``sidecar`` carries the fields of the contract (model, layers, in_shape,
    num_classes, classes, ...); ``format``, ``created``, ``cnnpipe_version``
    and ``weights_sha256`` are filled in here.
    """
    from safetensors.torch import save_file

    for key in ("layers", "in_shape", "num_classes"):
        if key not in sidecar:
            raise ValueError(f"checkpoint sidecar needs {key!r} to rebuild the model")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(directory) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        written = {
            "format": FORMAT,
            **{k: v for k, v in sidecar.items() if k != "format"},
            "cnnpipe_version": sidecar.get("cnnpipe_version") or __version__,
            "created": sidecar.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "weights_sha256": sha256_file(tmp / WEIGHTS_FILE),
        }
        written["layers"] = list(written["layers"])
        written["in_shape"] = [int(d) for d in written["in_shape"]]
        atomic_write_json(tmp / SIDECAR_FILE, written)
    return written


def read_sidecar(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated ``model.json`` of a checkpoint folder."""
    folder = Path(directory)
    path = folder / SIDECAR_FILE
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such checkpoint folder; train first (dvc repro train) or pass the right path")
    try:
        sidecar = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; this is not a cnnpipe checkpoint folder (re-run the train stage)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err.__class__.__name__}); re-run the train stage to rewrite the checkpoint") from None
    if not isinstance(sidecar, dict) or sidecar.get("format") != FORMAT:
        found = sidecar.get("format") if isinstance(sidecar, dict) else type(sidecar).__name__
        raise CheckpointError(f"{path} has format {found!r}, not {FORMAT!r}; re-create it with this cnnpipe (dvc repro train)")
    missing = [key for key in REQUIRED if key not in sidecar]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; re-run the train stage to rewrite the checkpoint")
    return sidecar


def load_checkpoint(directory: str | os.PathLike[str]) -> Checkpoint:
    """Rebuild the model from the sidecar alone and load the verified weights (CPU, eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cnnpipe.models.build import build_model

    folder = Path(directory)
    sidecar = read_sidecar(folder)
    weights = folder / WEIGHTS_FILE
    check_weights_file(weights, sidecar["weights_sha256"])
    sidecar_path = folder / SIDECAR_FILE
    try:
        model = build_model(sidecar["layers"], tuple(sidecar["in_shape"]), int(sidecar["num_classes"]), where="layers")
    except CnnpipeError as err:
        raise CheckpointError(f"{sidecar_path}: cannot rebuild the model ({_strip_source(err)}); it was written by another cnnpipe version or edited: re-run the train stage") from None
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{sidecar_path}: bad in_shape/num_classes ({err}); re-run the train stage") from None
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights} is unreadable ({err}); re-run the train stage") from None
    problem = fit_problem(model.state_dict(), state)
    if problem is not None:
        raise CheckpointError(f"{weights} does not fit the model in {SIDECAR_FILE} ({problem}); the two files come "
                              "from different runs: re-run the train stage")
    model.load_state_dict(state)
    return Checkpoint(model=model.eval(), sidecar=sidecar)


def _strip_source(err: Exception) -> str:
    text = str(err)
    return text.split(": ", 1)[1] if text.startswith("params.yaml: ") else text
