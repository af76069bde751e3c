"""Register a checkpoint: one MLflow model version per distinct set of weights, ``champion`` on the main line.

``register_checkpoint`` logs a checkpoint folder as an MLflow pyfunc model
(``serving.mlflow_model``) on the selected child run and registers it. A
train execution whose selected weights match an existing version registers
nothing and points the alias at that version instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cnnpipe.tracking.model_registry import WEIGHTS_TAG, find_version, is_main_line, link_tags, set_champion
from cnnpipe.util.errors import TrackingError
from cnnpipe.util.text import one_line
from cnnpipe.models.checkpoint import read_sidecar

if TYPE_CHECKING:
    from cnnpipe.tracking.runs import MlflowTracker


def register_checkpoint(tracker: "MlflowTracker", run_id: str | None, local_dir: Path, *, description: str = "",
                    tags: Mapping[str, str] | None = None, prepared_dir: Path | None = None) -> str | None:
    """Log a checkpoint folder as an MLflow pyfunc model under ``model/`` and register it.

    The model is built "from code" (``cnnpipe.serving``): safetensors + JSON
    as artifacts, nothing pickled. Weights already registered (same SHA-256)
    add no version: the existing one is reused. On the main line of work
    (not a queued experiment) the ``champion`` alias moves to the version.
    Returns ``"<name>/<version>"`` or None.
    """
    import tempfile

    from cnnpipe.serving.mlflow_model import save_pyfunc

    if not run_id or tracker.lost is not None:
        return None
    name = tracker.registered_model
    sha = read_sidecar(local_dir)["weights_sha256"]
    if name and _ensure_registered_model(tracker, name):
        existing = tracker.call("search_model_versions", find_version, tracker.client, name, sha)
        if existing is not None:
            print(f"mlflow: weights unchanged since {name}/{existing.version}; no new version", flush=True)
            return _crown(tracker, name, existing.version)
    with tempfile.TemporaryDirectory(prefix="cnnpipe-model-") as tmp:
        folder = Path(tmp) / "model"
        tracker.call("save_model", save_pyfunc, local_dir, folder, prepared_dir=prepared_dir)
        if folder.is_dir():
            tracker.call("log_artifacts", tracker.client.log_artifacts, run_id, str(folder), "model")
    if not name or tracker.lost is not None:
        return None
    run = tracker.call("get_run", tracker.client.get_run, run_id)
    if run is None:
        return None
    source = run.info.artifact_uri.rstrip("/") + "/model"
    version = tracker.call(
        "create_model_version", tracker.client.create_model_version, name, source, run_id,
        tags={WEIGHTS_TAG: sha, **link_tags(tracker.base_tags), **(tags or {})}, description=description or None, await_creation_for=0,
    )
    return _crown(tracker, name, version.version) if version is not None else None


def _ensure_registered_model(tracker: "MlflowTracker", name: str) -> bool:
    """Create the registered model unless it exists; False (or TrackingError) if the store refuses."""
    from mlflow.exceptions import MlflowException

    try:
        tracker.client.create_registered_model(name, description="CNN classifiers trained by cnnpipe: MLflow pyfunc "
                                            "models (safetensors + model.json, nothing pickled)")
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            message = f"MLflow could not create registered model {name!r}: {one_line(err.message)}"
            if not tracker.keep_going:
                raise TrackingError(f"{message}; set mlflow.registered_model: null to skip registering") from None
            tracker.failed(message)
            return False
    return True


def _crown(tracker: "MlflowTracker", name: str, version: str) -> str:
    """``champion`` -> this version on the main line of work; the ``"<name>/<version>"`` label."""
    if is_main_line():
        tracker.call("set_registered_model_alias", set_champion, tracker.client, name, version)
    return f"{name}/{version}"
