"""The MLflow model registry as cnnpipe reads it: versions by weights, their tags, ``champion``, ``models:/`` URIs.

A version is tagged with the SHA-256 of its ``model.safetensors``
(``WEIGHTS_TAG``), so ``find_version`` finds the version holding given
weights. ``champion`` follows the model the last ``dvc repro`` / ``dvc exp
run`` in the workspace selected (queued experiments, which run in temp
copies, leave it alone). Registering a checkpoint, which logs a pyfunc
model, is ``serving.register``'s job.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any
from cnnpipe.util.errors import CnnpipeError


if TYPE_CHECKING:

    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion


WEIGHTS_TAG = "cnnpipe.weights_sha256"
LOCK_TAG = "dvc.lock.models_best"  # the dvc.lock hash of models/best (set by evaluate, once DVC locked train)
CHAMPION = "champion"
BEST_OUT = "models/best"


def find_version(client: "MlflowClient", name: str, weights_sha256: str) -> "ModelVersion | None":
    """The oldest version of ``name`` whose weights hash is ``weights_sha256`` (None if none)."""
    found = client.search_model_versions(f"name = '{name}' and tags.`{WEIGHTS_TAG}` = '{weights_sha256}'")
    return min(found, key=lambda v: int(v.version)) if found else None


def is_main_line() -> bool:
    """True unless this is a queued experiment (its stage runs in a temp copy below ``$DVC_ROOT``)."""
    root = os.environ.get("DVC_ROOT")
    return not root or Path(root).resolve() == Path.cwd().resolve()


def set_champion(client: "MlflowClient", name: str, version: str) -> None:
    client.set_registered_model_alias(name, CHAMPION, str(version))


def dvc_lock_hash(lock_file: str | os.PathLike[str] = "dvc.lock", out: str = BEST_OUT) -> str | None:
    """The hash ``dvc.lock`` records for ``out`` of the train stage (None before DVC locked it)."""
    import yaml

    try:
        lock = yaml.safe_load(Path(lock_file).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return None
    for entry in ((lock.get("stages") or {}).get("train") or {}).get("outs") or []:
        if isinstance(entry, dict) and entry.get("path") == out:
            return entry.get("md5") or entry.get("hash")
    return None


def version_tags(params: dict[str, Any], metrics: dict[str, Any]) -> dict[str, str]:
    """Params (one JSON tag) and metrics as version tags (strings)."""
    import json

    tags = {"params": json.dumps(params, sort_keys=True)[:5000]}
    tags.update({key: "" if value is None else f"{value:.6g}" if isinstance(value, float) else str(value)
                 for key, value in metrics.items()})
    return tags


def link_tags(run_tags: dict[str, str]) -> dict[str, str]:
    """The DVC experiment name and git commit of the run (from ``tracking.context_tags``)."""
    links = {"dvc.exp_name": run_tags.get("dvc.exp_name"), "git.commit": run_tags.get("mlflow.source.git.commit")}
    return {key: value for key, value in links.items() if value}


# --------------------------------------------------------------------------- models:/ URIs


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, alias, version)."""
    rest = uri[len("models:/"):].strip("/") if uri.startswith("models:/") else ""
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in alias:
            return name, alias, None
    elif "/" in rest:
        name, _, version = rest.rpartition("/")
        if name and version.isdigit():
            return name, None, version
    raise CnnpipeError(f"{uri!r} is not a registered-model URI; use models:/NAME@ALIAS or models:/NAME/VERSION "
                       f"(e.g. models:/cnnpipe-classifier@{CHAMPION})")


def get_version(client: "MlflowClient", uri: str, store: str) -> "ModelVersion":
    """The version a ``models:/`` URI names, or one CnnpipeError line saying what is missing."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_models_uri(uri)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise
        known = [f"{v.version}" for v in client.search_model_versions(f"name = '{name}'")]
        have = f"versions {', '.join(sorted(known, key=int))}" if known else "no versions"
        raise CnnpipeError(f"{uri}: not in the model registry at {store} ({name} has {have}); "
                           "run the pipeline (dvc repro) or check the name/alias") from None


def describe_version(client: "MlflowClient", uri: str, store: str) -> tuple[str, dict[str, Any]]:
    """A header line for ``cnnpipe show-model models:/...`` and the version's ``model.json``."""
    import json
    import tempfile

    from mlflow.artifacts import download_artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a CLI answer, not a progress bar
    version = get_version(client, uri, store)
    aliases = ", ".join(version.aliases) or "none"
    with tempfile.TemporaryDirectory(prefix="cnnpipe-show-") as tmp:
        path = download_artifacts(artifact_uri=f"{version.source.rstrip('/')}/artifacts/checkpoint/model.json",
                                  dst_path=tmp, tracking_uri=store)
        sidecar = json.loads(Path(path).read_text(encoding="utf-8"))
    tags = version.tags
    header = (f"{uri} = {version.name} version {version.version} (aliases: {aliases}; run {version.run_id}; "
              f"git {tags.get('git.commit', '?')[:10]}; dvc exp {tags.get('dvc.exp_name', '-')}; "
              f"val_top1 {tags.get('val_top1', '?')}, test_top1 {tags.get('test_top1', '?')})")
    return header, sidecar


def download_checkpoint(client: "MlflowClient", uri: str, store: str, dst: str | os.PathLike[str]) -> Path:
    """The checkpoint folder (safetensors + model.json) of the version ``uri`` names, downloaded into ``dst``."""
    from mlflow.artifacts import download_artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    version = get_version(client, uri, store)
    return Path(download_artifacts(artifact_uri=f"{version.source.rstrip('/')}/artifacts/checkpoint",
                                   dst_path=str(dst), tracking_uri=store))
