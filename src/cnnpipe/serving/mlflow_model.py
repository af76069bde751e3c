"""Build the MLflow pyfunc model folder of a checkpoint ("models from code", nothing pickled).

The folder holds ``MLmodel``, the code file ``pyfunc_model.py``, the
checkpoint (``artifacts/checkpoint/``: safetensors + ``model.json``), a copy
of the ``cnnpipe`` package (``code/``, so the model loads where cnnpipe is not
installed), a signature, an input example and explicit pip requirements
(pinned to this environment; MLflow's slow requirement inference is skipped).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe.models.checkpoint import SIDECAR_FILE, WEIGHTS_FILE, read_sidecar
from cnnpipe.serving import pyfunc_model

if TYPE_CHECKING:
    import numpy as np
    from mlflow.models import ModelSignature

CODE_FILE = Path(pyfunc_model.__file__)
PACKAGE_DIR = CODE_FILE.parents[1]  # src/cnnpipe, shipped under code/
PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
EXAMPLE_IMAGES = 2  # rows of the input example (kept small: it is stored as JSON in the model)
# What loading and predicting import (checked by tests/test_serving.py in a fresh process).
REQUIREMENTS = ("mlflow", "torch", "torchvision", "safetensors", "numpy", "pandas", "pydantic", "pyyaml", "tqdm")  # torchvision: torchvision:NAME models


def pip_requirements() -> list[str]:
    """``name==version`` of this environment for each package the model needs."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def signature(sidecar: dict[str, Any]) -> "ModelSignature":
    """uint8 ``N x C x H x W`` in; a probability column per class, ``label`` and ``top_k`` out; ``top_k`` param."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
    from mlflow.types.schema import Array

    shape = (-1, *(int(d) for d in sidecar["in_shape"]))
    outputs = [ColSpec("float", name) for name in sidecar["classes"]]
    outputs += [ColSpec("string", "label"), ColSpec(Array("string"), "top_k")]
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), shape)]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("top_k", "long", pyfunc_model.DEFAULT_TOP_K)]),
    )


def input_example(prepared_dir: str | os.PathLike[str] | None, shape: tuple[int, ...]) -> "np.ndarray | None":
    """The first test images (val when the test split is absent), read without loading the whole split."""
    import numpy as np
    from safetensors import safe_open

    if prepared_dir is None:
        return None
    for split in ("test", "val"):
        path = Path(prepared_dir) / f"{split}.safetensors"
        if not path.is_file():
            continue
        with safe_open(str(path), framework="numpy") as handle:
            if "images" not in handle.keys():
                continue
            images = handle.get_slice("images")[:EXAMPLE_IMAGES]
        if images.dtype == np.uint8 and tuple(images.shape[1:]) == tuple(shape):
            return np.ascontiguousarray(images)
    return None


def save_pyfunc(checkpoint_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
                prepared_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the pyfunc model folder ``out_dir`` (must not exist) for ``checkpoint_dir``."""
    import shutil
    import tempfile


    sidecar = read_sidecar(checkpoint_dir)
    example = input_example(prepared_dir, tuple(sidecar["in_shape"]))
    with tempfile.TemporaryDirectory(prefix="cnnpipe-pyfunc-") as tmp:
        # MLflow names the artifact folder after its source: give it a stable name, weights + sidecar only.
        staged = Path(tmp) / pyfunc_model.ARTIFACT
        staged.mkdir()
        for name in (WEIGHTS_FILE, SIDECAR_FILE):
            shutil.copy2(Path(checkpoint_dir) / name, staged / name)
        _save(staged, out_dir, sidecar, example)
    return Path(out_dir)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No INFO lines or progress bars from MLflow's input-example check in the stage's output."""
    import logging

    logger = logging.getLogger("mlflow.pyfunc")
    level, bar = logger.level, os.environ.get(PROGRESS_BAR)
    logger.setLevel(logging.WARNING)
    os.environ[PROGRESS_BAR] = "false"
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop(PROGRESS_BAR, None)
        else:
            os.environ[PROGRESS_BAR] = bar


def _save(checkpoint_dir: Path, out_dir: str | os.PathLike[str], sidecar: dict[str, Any], example: Any) -> None:
    """``mlflow.pyfunc.save_model`` from code.

    The first call in a process spends seconds in MLflow's check of the pins
    against the installed packages (it scans every distribution); later calls
    are much faster (figures in benchmarks/README.md).
    """
    import mlflow.pyfunc

    with _quiet():
        mlflow.pyfunc.save_model(
            path=str(out_dir),
            python_model=str(CODE_FILE),
            artifacts={pyfunc_model.ARTIFACT: str(checkpoint_dir)},
            code_paths=[str(PACKAGE_DIR)],
            signature=signature(sidecar),
            input_example=example,
            pip_requirements=pip_requirements(),
        )
