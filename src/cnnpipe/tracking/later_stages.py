"""What the later stages (evaluate, plots) add to the runs ``train`` created.

Test metrics go to the selected child and the parent, report files and
figures to the parent's artifacts, and test metrics to the registered model
version holding the selected weights. One client per process
(``store.client_for``), opened early by ``store.warm_up`` while the stage computes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from cnnpipe.tracking.runs import MlflowTracker
from cnnpipe.tracking.connection import client_for, preflight, settle_warm_up
from cnnpipe.util.errors import TrackingError
from cnnpipe.util.text import one_line
from cnnpipe.tracking.model_registry import find_version, version_tags

if TYPE_CHECKING:
    from cnnpipe.params.sections import MlflowParams


def log_evaluation(settings: "MlflowParams", *, parent_run_id: str | None, child_run_id: str | None = None,
                   metrics: Mapping[str, float] | None = None, files: list[Path] | None = None,
                   artifact_path: str = "evaluation", artifacts: Mapping[str, list[Path]] | None = None,
                   root: Path | None = None, weights_sha256: str | None = None,
                   model_tags: Mapping[str, str] | None = None) -> bool:
    """Add a later stage's results to the runs ``train`` created (ids from train.json / the sidecar).

    ``metrics`` go to the best child and the parent (one ``log_batch`` each),
    ``files`` to the parent under ``artifact_path`` and ``artifacts`` (artifact
    path -> files) beside them, through one client per process (``client_for``,
    started early by ``warm_up``); ``model_tags`` (with ``metrics``) go to the
    registered version holding ``weights_sha256``. Returns False, with one
    note, when tracking is off or the runs are not in this store (e.g. the
    checkpoint was trained against another store); an unreachable store is a
    ``TrackingError`` like in ``train``.
    """
    if not settings.enabled or not parent_run_id:
        return False
    settle_warm_up()  # the warm-up thread's mlflow import, finished before this thread imports mlflow
    target = preflight(settings, root=root)
    assert target is not None
    from mlflow.exceptions import MlflowException

    run_ids = [run for run in (child_run_id, parent_run_id) if run]
    try:
        tracker = MlflowTracker(uri=target.uri, experiment_id="", parent_run_id=parent_run_id, _parent_open=False,
                                _client=client_for(target.uri))
        for run_id in run_ids:
            tracker.client.get_run(run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise TrackingError(f"MLflow store {target.uri} failed: {one_line(err.message)}; fix {target.origin} or set mlflow.enabled: false") from None
        print(f"mlflow: run {run_id} is not in {target.uri} (trained against another store?); results not logged", flush=True)
        return False
    for run_id in run_ids:
        tracker._batch(run_id, metrics=metrics)
    for folder, paths in {artifact_path: list(files or []), **dict(artifacts or {})}.items():
        for path in paths:
            if Path(path).is_file():
                tracker.call("log_artifact", tracker.client.log_artifact, parent_run_id, str(path), folder)
    if settings.registered_model and weights_sha256:
        _tag_version(tracker, settings.registered_model, weights_sha256,
                     {**registry_metric_tags(metrics or {}), **(model_tags or {})})
    return True


def registry_metric_tags(metrics: Mapping[str, float]) -> dict[str, str]:
    return {key: value for key, value in version_tags({}, dict(metrics)).items() if key != "params"}


def _tag_version(tracker: MlflowTracker, name: str, weights_sha256: str, tags: Mapping[str, str]) -> None:
    """Add ``tags`` to the version of ``name`` whose weights are ``weights_sha256`` (if registered here)."""
    from mlflow.exceptions import MlflowException

    try:
        version = find_version(tracker.client, name, weights_sha256)
    except MlflowException:
        version = None
    if version is None:
        print(f"mlflow: no version of {name} holds these weights; its tags are not updated", flush=True)
        return
    for key, value in tags.items():
        tracker.call("set_model_version_tag", tracker.client.set_model_version_tag, name, version.version, key, value)
