"""The MLflow "models from code" file of a cnnpipe classifier.

MLflow copies this file into every logged model and *executes* it when the
model is loaded (``mlflow.pyfunc.load_model``, ``mlflow models serve``):
nothing of ours is pickled, and loading reads only the safetensors weights
and the ``model.json`` sidecar through ``cnnpipe.models.checkpoint`` (hash-checked,
never unpickled). Input: a batch of raw images ``N x C x H x W`` (uint8,
0-255, the dataset's shape). Output: one row per image, the probability of
every class (one column per class name), ``label`` (top-1) and ``top_k``
(the ``top_k`` most likely labels, best first; ``params={"top_k": K}``).
"""

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel
from cnnpipe.models.checkpoint import load_checkpoint
from cnnpipe.serving.classify import predictions_frame

ARTIFACT = "checkpoint"  # the artifacts key: the checkpoint folder (model.safetensors + model.json)
DEFAULT_TOP_K = 3


class CnnpipeClassifier(PythonModel):
    """A checkpoint folder behind MLflow's pyfunc interface (same maths as ``cnnpipe predict``)."""

    def load_context(self, context) -> None:  # noqa: ANN001

        self.checkpoint = load_checkpoint(context.artifacts[ARTIFACT])

    # np.ndarray: a hint MLflow derives no schema from (the signature is explicit); a missing hint warns.
    def predict(self, context, model_input: np.ndarray, params: dict | None = None):  # noqa: ANN001, ANN201

        top_k = int((params or {}).get("top_k") or DEFAULT_TOP_K)
        return predictions_frame(self.checkpoint, model_input, top_k)


mlflow.models.set_model(CnnpipeClassifier())
