"""Class probabilities for a batch of raw images: the one computation every consumer shares.

``cnnpipe predict``, the MLflow pyfunc model and the export checks all call
``evaluate_logits`` with the checkpoint's own normalization, so their
probabilities are the same numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cnnpipe.util.errors import CnnpipeError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from cnnpipe.models.checkpoint import Checkpoint


def as_batch(images: Any, shape: tuple[int, ...]) -> "np.ndarray":
    """``images`` as an ``N x C x H x W`` array of the checkpoint's shape (one image gets a batch axis)."""
    import numpy as np

    array = np.asarray(images)
    if array.ndim == len(shape):
        array = array[None]
    if array.ndim != len(shape) + 1 or tuple(array.shape[1:]) != tuple(shape):
        raise CnnpipeError(f"images have shape {tuple(array.shape)}, the model needs N x {' x '.join(map(str, shape))} "
                           "(raw pixels 0-255); resize them or use cnnpipe predict, which converts image files")
    return array


def probabilities(checkpoint: "Checkpoint", images: Any) -> "np.ndarray":
    """Softmax of the logits, float32 ``N x classes``."""
    import torch

    from cnnpipe.engine.inference import evaluate_logits

    side = checkpoint.sidecar
    batch = torch.from_numpy(as_batch(images, tuple(side["in_shape"])).copy())
    logits = evaluate_logits(checkpoint.model, batch, mean=side["mean"], std=side["std"])
    return torch.softmax(logits.float(), dim=1).numpy()


def predictions_frame(checkpoint: "Checkpoint", images: Any, top_k: int) -> "pd.DataFrame":
    """One row per image: a probability column per class, ``label`` (top-1) and ``top_k`` labels."""
    import numpy as np
    import pandas as pd

    classes = list(checkpoint.classes)
    if not 1 <= top_k <= len(classes):
        raise CnnpipeError(f"top_k must be between 1 and {len(classes)} (the number of classes), got {top_k}")
    probs = probabilities(checkpoint, images)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
    frame = pd.DataFrame(probs, columns=classes)
    frame["label"] = [classes[row[0]] for row in order]
    frame["top_k"] = [[classes[i] for i in row] for row in order]
    return frame
