"""Where the MLflow store is, whether it answers, and the clients that talk to it.

``$MLFLOW_TRACKING_URI`` > ``mlflow.tracking_uri`` in params > ``mlflow.db`` at
the project root (``$DVC_ROOT`` in a queued experiment, so its runs land in
the same store as everyone else's instead of a temp copy that is deleted).
A new sqlite store's schema is created under a file lock (several queue
workers may open it at once).
"""

from __future__ import annotations

import contextlib
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cnnpipe.util.errors import TrackingError
from cnnpipe.util.locks import held
from cnnpipe.util.paths import project_root
from cnnpipe.util.text import one_line

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from cnnpipe.params.sections import MlflowParams

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
ENV_URI = "MLFLOW_TRACKING_URI"
REACH_TIMEOUT_S = 3.0
# The MLflow 3 UI opens an experiment without this tag in its GenAI view (traces, judges);
# "custom_model_development" (a value of the UI's ExperimentKind) opens the runs table.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_WORKFLOW = "workflowType=machine_learning"  # the 3.17 UI's own switch; see ui_url
# A tracking server that goes away mid-grid must not stall training for minutes
# (MLflow's defaults: 7 retries, backoff factor 2, 120 s timeout). The stage's own
# client uses these unless the user set the variables.
HTTP_CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


@dataclass(frozen=True)
class TrackingTarget:
    """A resolved store: the URI, where new experiments put artifacts, and who chose it."""

    uri: str
    artifact_location: str | None  # None: the server decides (http stores)
    origin: str  # "MLFLOW_TRACKING_URI", "mlflow.tracking_uri in params.yaml" or "default"

    @property
    def is_remote(self) -> bool:
        return self.uri.startswith(("http://", "https://"))

    @property
    def tracking_uri(self) -> str:
        return self.uri


def resolve_target(tracking_uri: str | None = None, *, root: Path | None = None) -> TrackingTarget:
    """``$MLFLOW_TRACKING_URI`` > ``tracking_uri`` (params) > ``sqlite:///<root>/mlflow.db``.

    A relative sqlite path is anchored at the project root, and local stores
    keep artifacts in ``mlartifacts/`` beside the database, so nothing ever
    lands in a queued experiment's temp copy.
    """
    base = (root or project_root()).resolve()
    env = os.environ.get(ENV_URI, "").strip()
    if env:
        uri, origin = env, ENV_URI
    elif tracking_uri:
        uri, origin = tracking_uri.strip(), "mlflow.tracking_uri in params.yaml"
    else:
        uri, origin = f"sqlite:///{base / DB_NAME}", "default"
    if uri.startswith(("http://", "https://", "databricks")):
        return TrackingTarget(uri.rstrip("/"), None, origin)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        db = db if db.is_absolute() else base / db
        return TrackingTarget(f"sqlite:///{db}", str(db.parent / ARTIFACTS_DIR), origin)
    if "://" not in uri and not uri.startswith("file:"):  # a bare folder path (MLflow's file store)
        folder = Path(uri)
        uri = str(folder if folder.is_absolute() else base / folder)
    return TrackingTarget(uri, str(base / ARTIFACTS_DIR), origin)


def resolve_store(settings: "MlflowParams", *, root: Path | None = None) -> TrackingTarget:
    """The store ``params.mlflow`` (and ``$MLFLOW_TRACKING_URI``) point at, for ``cnnpipe ui`` and friends."""
    return resolve_target(settings.tracking_uri, root=root)


def check_reachable(target: TrackingTarget, timeout: float = REACH_TIMEOUT_S) -> None:
    """Fail fast, before any training, if the store cannot be used.

    http(s): a short GET of ``/health`` (any HTTP answer counts as reachable;
    only a refused/timed-out connection fails). sqlite: its folder must exist
    or be creatable.
    """
    fix = f"fix {target.origin}, or set mlflow.enabled: false in params.yaml"
    if target.is_remote:
        try:
            with urllib.request.urlopen(f"{target.uri}/health", timeout=timeout):
                return
        except urllib.error.HTTPError:
            return  # the server answered; auth or routing problems surface on the first write
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"MLflow tracking server {target.uri} is unreachable ({reason}); start it "
                f"(mlflow server --host 127.0.0.1 --port PORT), {fix}"
            ) from None
    if target.uri.startswith("sqlite:///"):
        folder = Path(target.uri[len("sqlite:///"):]).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"cannot create the MLflow store folder {folder} ({err.strerror}); {fix}") from None


def ui_url(target: TrackingTarget, experiment: str, base: str) -> str:
    """The UI page of ``experiment`` in MLflow 3's "Model training" view (its runs table).

    The 3.17 UI picks GenAI vs Model training from ``?workflowType=`` (else the
    browser's last choice, GenAI at first), whatever the experiment's kind tag
    says. The experiment id is read from a sqlite store without importing mlflow.
    """
    import sqlite3

    experiment_id = None
    if target.uri.startswith("sqlite:///"):
        db = Path(target.uri[len("sqlite:///"):])
        with contextlib.suppress(sqlite3.Error):
            connection = sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)
            try:
                row = connection.execute("SELECT experiment_id FROM experiments WHERE name = ? "
                                         "AND lifecycle_stage = 'active'", (experiment,)).fetchone()
            finally:
                connection.close()
            experiment_id = row[0] if row else None
    page = f"#/experiments/{experiment_id}" if experiment_id is not None else "#/"
    return f"{base}/{page}?{UI_WORKFLOW}"



def preflight(settings: "MlflowParams", *, root: Path | None = None) -> TrackingTarget | None:
    """Resolve and check the store without importing mlflow (None when tracking is off).

    The stage calls this before loading data, so an unreachable server is one
    ``TrackingError`` line before anything slow happens.
    """
    if not settings.enabled:
        return None
    target = resolve_target(settings.tracking_uri, root=root)
    check_reachable(target)
    return target


def store_lock_path(uri: str) -> Path | None:
    """``<folder>/.<db name>.lock`` beside a sqlite store (``<root>/.mlflow.db.lock``); None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return db.parent / f".{db.name}.lock"


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold the lock beside a sqlite store while the block runs (a no-op for other stores).

    MLflow creates (or upgrades) a sqlite store's schema on the first client
    that touches it, and two processes doing so at once fail with ``table ...
    already exists``: queue workers, parallel ``dvc exp run``s and grid
    workers all start at the same moment on a fresh project. The lock
    serialises that first touch; once the schema exists it is held for a
    millisecond.
    """
    path = store_lock_path(uri)
    if path is None:
        yield
        return
    with held(path):
        yield


def make_client(uri: str) -> "MlflowClient":
    """A client whose tracking and registry stores exist (schema created under ``store_lock``)."""
    import logging

    if uri.startswith(("http://", "https://")):
        for name, value in HTTP_CLIENT_DEFAULTS.items():
            os.environ.setdefault(name, value)

    # Table creation on a new sqlite store logs INFO lines through alembic; keep stage output clean.
    for name in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from mlflow import MlflowClient

    if store_lock_path(uri) is None:
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    with store_lock(uri):
        # The client opens the tracking store at once and the registry store on
        # first use; opening either creates or upgrades its tables.
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_registered_models(max_results=1)
    return client


_CLIENTS: dict[str, "MlflowClient"] = {}
_CLIENTS_LOCK = threading.Lock()


def client_for(uri: str) -> "MlflowClient":
    """One client per store and process: the later stages log several times, and a client costs seconds to start."""
    with _CLIENTS_LOCK:
        if uri not in _CLIENTS:
            _CLIENTS[uri] = make_client(uri)
        return _CLIENTS[uri]


_WARMING: list[threading.Thread] = []  # warm-up threads still to be waited for


def warm_up(settings: "MlflowParams", *, root: Path | None = None) -> threading.Thread | None:
    """Import mlflow and open the store in a background thread while the stage computes.

    ``evaluate`` and ``plots`` spend their time in torch/matplotlib code that
    releases the GIL; importing mlflow (seconds: benchmarks/README.md) and
    opening the store overlap with it instead of following it. Errors are left for the real call to
    report (one line, as always); nothing is started when tracking is off.
    """
    if not settings.enabled:
        return None

    def work() -> None:
        with contextlib.suppress(Exception):
            client_for(preflight(settings, root=root).uri)  # type: ignore[union-attr]

    thread = threading.Thread(target=work, name="mlflow-warm-up", daemon=True)
    _WARMING.append(thread)
    thread.start()
    return thread


def settle_warm_up() -> None:
    """Wait for ``warm_up``'s thread before this thread touches mlflow itself.

    Two threads importing mlflow at once can meet a half-initialised protobuf
    module (Python hands one over to avoid an import deadlock), and mlflow then
    fails with "Couldn't build proto file into descriptor pool". The warm-up
    has done its job by the time a stage logs; waiting costs what is left of it.
    """
    while _WARMING:
        _WARMING.pop().join()


def ensure_experiment(client: "MlflowClient", name: str, artifact_location: str | None) -> str:
    """The experiment's id, creating it (with our artifact root) when new; restores a deleted one.

    It is marked a model-training experiment (``EXPERIMENT_KIND``), also when an
    older cnnpipe created it without a kind, so the MLflow UI opens on its runs
    table instead of the GenAI (traces) view.
    """
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags=dict([EXPERIMENT_KIND]))
        except MlflowException as err:  # created concurrently by another queue worker
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise TrackingError(f"MLflow could not create experiment {name!r}: {one_line(err.message)}") from None
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND[0] not in experiment.tags:  # a kind the user chose stays
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


