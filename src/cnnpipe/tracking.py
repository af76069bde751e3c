"""Every MLflow call cnnpipe makes lives here.

One train execution is one *parent* run; each grid point is a nested *child*
run (``mlflow.parentRunId``). Only ``MlflowClient`` is used (never the fluent
``mlflow.start_run`` stack), so a tracker is a few plain strings that a
parallel worker can rebuild, and nothing depends on a global "active run".

mlflow is imported lazily inside functions: it costs ~3 s, and with
``mlflow.enabled: false`` (``NullTracker``) it is never imported at all.

The store is anchored at the project root (``$DVC_ROOT`` in a queued
experiment), never at the cwd, so a queued experiment's runs land in the same
``mlflow.db`` as everyone else's instead of a temp copy that is deleted.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe import __version__
from cnnpipe.util.errors import TrackingError
from cnnpipe.util.paths import project_root, work_dir

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput

    from cnnpipe.params import MlflowParams

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
ENV_URI = "MLFLOW_TRACKING_URI"
REACH_TIMEOUT_S = 3.0
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
ROLE = "cnnpipe.role"
LOCK_RETRIES = 4
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


# --------------------------------------------------------------------------- where the store is


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


# --------------------------------------------------------------------------- helpers


def _one_line(err: BaseException | str, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _git_commit(cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and len(commit) == 40 else None


def context_tags() -> dict[str, str]:
    """Tags shared by the parent and every child: code version, DVC context, process."""
    tags = {
        "cnnpipe.version": __version__,
        "cnnpipe.pid": str(os.getpid()),
        "cnnpipe.host": socket.gethostname(),
        "mlflow.source.name": "stages/train.py",
        "mlflow.source.type": "LOCAL",
    }
    with contextlib.suppress(Exception):
        tags["mlflow.user"] = getpass.getuser()
    commit = _git_commit(work_dir())
    if commit:
        tags["mlflow.source.git.commit"] = commit
    for env, key in (("DVC_EXP_NAME", "dvc.exp_name"), ("DVC_EXP_BASELINE_REV", "dvc.exp_baseline_rev"), ("DVC_STAGE", "dvc.stage")):
        value = os.environ.get(env)
        if value:
            tags[key] = value
    return tags


def parent_run_name() -> str:
    """``$DVC_EXP_NAME`` when DVC runs an experiment, else ``train-<UTC timestamp>``."""
    return os.environ.get("DVC_EXP_NAME") or "train-" + datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_PARAM_CHARS]


def _finite_or_nan(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


# --------------------------------------------------------------------------- trackers


class NullTracker:
    """Tracking switched off (``mlflow.enabled: false``): every call is a no-op.

    The grid and the stage call the same methods either way, so "tracking off"
    is one object, not an ``if`` in every function.
    """

    enabled = False
    uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None
    lost: str | None = None  # why logging stopped part-way (MlflowTracker with keep_going)

    def start_child(self, name: str, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> str | None:
        return None

    def reopen_child(self, run_id: str, *, tags: Mapping[str, str]) -> set[int] | None:
        return None

    def log_epoch(self, run_id: str | None, step: int, metrics: Mapping[str, float]) -> None:
        return None

    def log_epochs(self, run_id: str | None, epochs: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        return None

    def end_child(self, run_id: str | None, *, status: str, reason: str = "", metrics: Mapping[str, float] | None = None,
                  tags: Mapping[str, str] | None = None, texts: Mapping[str, str] | None = None,
                  files: list[Path] | None = None) -> None:
        return None

    def log_model(self, run_id: str | None, local_dir: Path, *, description: str = "", tags: Mapping[str, str] | None = None,
                  prepared_dir: Path | None = None) -> str | None:
        return None

    def log_parent(self, *, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
                   tags: Mapping[str, str] | None = None, files: list[Path] | None = None,
                   table: "pd.DataFrame | None" = None) -> None:
        return None

    def end_parent(self, status: str = "FINISHED", reason: str = "") -> None:
        return None

    @contextlib.contextmanager
    def running(self) -> Iterator["NullTracker"]:
        yield self


@contextlib.contextmanager
def ctrl_c_after_the_call() -> Iterator[None]:
    """Hold a Ctrl-C that lands inside one MLflow call until the call returns; a second one stops at once.

    A KeyboardInterrupt raised mid-call leaves MLflow's SQLAlchemy session open
    while the traceback is alive, holding the sqlite write lock, so the KILLED
    status written next waited ~100 s on its own process and was lost (the
    parent stayed RUNNING). Calls take milliseconds; a stuck one (a server that
    does not answer) still stops on the second Ctrl-C.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield
        return
    held: list[Any] = []

    def hold(signum: int, frame: Any) -> None:
        held.append(frame)
        signal.signal(signal.SIGINT, previous)  # the next Ctrl-C interrupts the call itself

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if held:
            previous(signal.SIGINT, held[0])


@dataclass
class MlflowTracker(NullTracker):
    """A live parent run in an MLflow store, plus helpers for its children.

    Plain strings only (uri, experiment and parent ids): the client is made on
    first use, so a future process/Ray worker can rebuild it from a pickle.
    """

    uri: str
    experiment_id: str
    parent_run_id: str
    registered_model: str | None = None
    base_tags: dict[str, str] = field(default_factory=dict)
    _client: Any = field(default=None, repr=False, compare=False)
    _parent_open: bool = field(default=True, repr=False, compare=False)
    # keep_going (the train stage): a store lost after the parent run started stops
    # the logging, not the training; the first failure is kept in ``lost`` and every
    # later MLflow call is skipped. Otherwise a failed call raises TrackingError.
    keep_going: bool = field(default=False, compare=False)
    lost: str | None = field(default=None, compare=False)
    dataset: tuple[str, str, str] | None = None  # (name, digest, source): see ``dataset_input``
    enabled = True

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_client"] = None
        return state

    @property
    def client(self) -> "MlflowClient":
        if self._client is None:
            self._client = _make_client(self.uri)
        return self._client

    # ----------------------------------------------------------- low level

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one MLflow call; retry a locked sqlite briefly; fail with one line (see ``keep_going``)."""
        from mlflow.exceptions import MlflowException

        if self.lost is not None:
            return None
        delay = 0.25
        for attempt in range(LOCK_RETRIES + 1):
            try:
                with ctrl_c_after_the_call():
                    return fn(*args, **kwargs)
            except MlflowException as err:
                if "locked" in str(err).lower() and attempt < LOCK_RETRIES:
                    time.sleep(delay)
                    delay *= 2
                    continue
                return self._failed(f"MLflow {what} failed at {self.uri}: {_one_line(err.message)}")
            except OSError as err:
                return self._failed(f"MLflow {what} failed at {self.uri}: {_one_line(err)}")
        raise AssertionError("unreachable")

    def _failed(self, message: str) -> None:
        """Raise the one-line TrackingError, or (``keep_going``) remember it and stop logging."""
        if not self.keep_going:
            raise TrackingError(f"{message}; check the store or set mlflow.enabled: false")
        self.lost = message
        print(f"mlflow: {message}; training goes on without tracking", file=sys.stderr, flush=True)

    def _batch(self, run_id: str, *, metrics: Mapping[str, float] | None = None, params: Mapping[str, Any] | None = None,
               tags: Mapping[str, str] | None = None, step: int = 0) -> None:
        """Metrics, params and tags in ONE round-trip (the client chunks past MLflow's limits)."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        entities = {
            "metrics": [Metric(key, _finite_or_nan(value), now, step) for key, value in (metrics or {}).items()],
            "params": [Param(key, _param_value(value)) for key, value in (params or {}).items()],
            "tags": [RunTag(key, str(value)) for key, value in (tags or {}).items()],
        }
        if any(entities.values()):
            self._call("log_batch", self.client.log_batch, run_id, **entities)

    def _terminate(self, run_id: str, status: str) -> None:
        self._call("set_terminated", self.client.set_terminated, run_id, status)

    # ----------------------------------------------------------- children

    def start_child(self, name: str, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """A nested run for one grid point; its params go in with the same call batch."""
        run_tags = {**self.base_tags, "cnnpipe.pid": str(os.getpid()), **tags,
                    "mlflow.parentRunId": self.parent_run_id, ROLE: "child"}
        run = self._call("create_run", self.client.create_run, self.experiment_id, run_name=name, tags=run_tags)
        if run is None:  # the store was lost (keep_going)
            return None
        run_id = run.info.run_id
        self._batch(run_id, params=params)
        if self.dataset:
            self._call("log_inputs", self.client.log_inputs, run_id, [dataset_input(*self.dataset)])
        return run_id

    def reopen_child(self, run_id: str, *, tags: Mapping[str, str]) -> set[int] | None:
        """Continue a child run of an execution that was killed: it moves under this parent, RUNNING again.

        Returns the epochs it already logged (so each epoch appears once), or
        None when the run is gone, finished, or from another experiment: then
        the caller starts a new child.
        """
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        if run.info.experiment_id != self.experiment_id or run.info.status == "FINISHED":
            return None
        pid = run.data.tags.get("cnnpipe.pid", "")
        if run.info.status == "RUNNING" and (run.data.tags.get("cnnpipe.host") != socket.gethostname()
                                             or not pid.isdigit() or _pid_alive(int(pid))):
            return None  # another live train (a parallel experiment) owns it: never take it over
        history = self._call("get_metric_history", self.client.get_metric_history, run_id, "val_loss") or []
        self._call("update_run", self.client.update_run, run_id, status="RUNNING")
        self._batch(run_id, tags={**tags, "mlflow.parentRunId": self.parent_run_id, "cnnpipe.pid": str(os.getpid())})
        return {int(metric.step) for metric in history}

    def log_epoch(self, run_id: str | None, step: int, metrics: Mapping[str, float]) -> None:
        if run_id:
            self._batch(run_id, metrics=metrics, step=step)

    def log_epochs(self, run_id: str | None, epochs: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        """Many epochs' metrics in one round-trip: a reused run's whole history (39 calls cost ~1.3 s)."""
        if not run_id or not epochs:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, _finite_or_nan(value), now, step) for step, values in epochs for key, value in values.items()]
        if metrics:
            self._call("log_batch", self.client.log_batch, run_id, metrics=metrics)

    def end_child(self, run_id: str | None, *, status: str, reason: str = "", metrics: Mapping[str, float] | None = None,
                  tags: Mapping[str, str] | None = None, texts: Mapping[str, str] | None = None,
                  files: list[Path] | None = None) -> None:
        """Final metrics, artifacts and the terminal status (FINISHED / FAILED / KILLED)."""
        if not run_id:
            return
        all_tags = dict(tags or {})
        if reason and status != "FINISHED":
            all_tags["failure_reason"] = _one_line(reason, 5000)
        self._batch(run_id, metrics=metrics, tags=all_tags)
        for name, text in (texts or {}).items():
            self._call("log_text", self.client.log_text, run_id, text, name)
        for path in files or []:
            if Path(path).is_file():
                self._call("log_artifact", self.client.log_artifact, run_id, str(path))
        self._terminate(run_id, status)

    def log_model(self, run_id: str | None, local_dir: Path, *, description: str = "", tags: Mapping[str, str] | None = None,
                  prepared_dir: Path | None = None) -> str | None:
        """Log a checkpoint folder as an MLflow pyfunc model under ``model/`` and register it.

        The model is built "from code" (``cnnpipe.serving``): safetensors + JSON
        as artifacts, nothing pickled. Weights already registered (same SHA-256)
        add no version: the existing one is reused. On the main line of work
        (not a queued experiment) the ``champion`` alias moves to the version.
        Returns ``"<name>/<version>"`` or None.
        """
        import tempfile

        from cnnpipe.models.checkpoint import read_sidecar
        from cnnpipe.serving import registry
        from cnnpipe.serving.mlflow_model import save_pyfunc

        if not run_id or self.lost is not None:
            return None
        name = self.registered_model
        sha = read_sidecar(local_dir)["weights_sha256"]
        if name and self._ensure_registered_model(name):
            existing = self._call("search_model_versions", registry.find_version, self.client, name, sha)
            if existing is not None:
                print(f"mlflow: weights unchanged since {name}/{existing.version}; no new version", flush=True)
                return self._crown(name, existing.version)
        with tempfile.TemporaryDirectory(prefix="cnnpipe-model-") as tmp:
            folder = Path(tmp) / "model"
            self._call("save_model", save_pyfunc, local_dir, folder, prepared_dir=prepared_dir)
            if folder.is_dir():
                self._call("log_artifacts", self.client.log_artifacts, run_id, str(folder), "model")
        if not name or self.lost is not None:
            return None
        run = self._call("get_run", self.client.get_run, run_id)
        if run is None:
            return None
        source = run.info.artifact_uri.rstrip("/") + "/model"
        version = self._call(
            "create_model_version", self.client.create_model_version, name, source, run_id,
            tags={registry.WEIGHTS_TAG: sha, **registry.link_tags(self.base_tags), **(tags or {})}, description=description or None, await_creation_for=0,
        )
        return self._crown(name, version.version) if version is not None else None

    def _ensure_registered_model(self, name: str) -> bool:
        """Create the registered model unless it exists; False (or TrackingError) if the store refuses."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="CNN classifiers trained by cnnpipe: MLflow pyfunc "
                                                "models (safetensors + model.json, nothing pickled)")
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                message = f"MLflow could not create registered model {name!r}: {_one_line(err.message)}"
                if not self.keep_going:
                    raise TrackingError(f"{message}; set mlflow.registered_model: null to skip registering") from None
                self._failed(message)
                return False
        return True

    def _crown(self, name: str, version: str) -> str:
        """``champion`` -> this version on the main line of work; the ``"<name>/<version>"`` label."""
        from cnnpipe.serving import registry

        if registry.is_main_line():
            self._call("set_registered_model_alias", registry.set_champion, self.client, name, version)
        return f"{name}/{version}"

    # ----------------------------------------------------------- parent

    def log_parent(self, *, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
                   tags: Mapping[str, str] | None = None, files: list[Path] | None = None,
                   table: "pd.DataFrame | None" = None) -> None:
        self._batch(self.parent_run_id, params=params, metrics=metrics, tags=tags)
        for path in files or []:
            if Path(path).is_file():
                self._call("log_artifact", self.client.log_artifact, self.parent_run_id, str(path))
        if table is not None:
            self._call("log_table", self.client.log_table, self.parent_run_id, table, "grid_table.json")

    def end_parent(self, status: str = "FINISHED", reason: str = "") -> None:
        if not self._parent_open:
            return
        if reason and status != "FINISHED":
            self._batch(self.parent_run_id, tags={"failure_reason": _one_line(reason, 5000)})
        self._terminate(self.parent_run_id, status)
        self._parent_open = False

    @contextlib.contextmanager
    def running(self) -> Iterator["MlflowTracker"]:
        """Close the parent run however the body ends: FINISHED, FAILED, or KILLED on Ctrl-C."""
        try:
            yield self
        except KeyboardInterrupt:
            with contextlib.suppress(Exception):
                self.end_parent("KILLED", "interrupted (Ctrl-C)")
            raise
        except BaseException as err:
            with contextlib.suppress(Exception):
                self.end_parent("FAILED", f"{type(err).__name__}: {err}")
            raise
        else:
            self.end_parent("FINISHED")


# --------------------------------------------------------------------------- opening


def store_lock_path(uri: str) -> Path | None:
    """``<folder>/.<db name>.lock`` beside a sqlite store (``<root>/.mlflow.db.lock``); None for other stores."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///"):])
    return db.parent / f".{db.name}.lock"


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the store's lock file (sqlite only; a no-op elsewhere).

    MLflow creates (or upgrades) a sqlite store's schema on the first client
    that touches it, and two processes doing so at once fail with ``table ...
    already exists``: queue workers, parallel ``dvc exp run``s and grid
    workers all start at the same moment on a fresh project. The lock
    serialises that first touch; once the schema exists it is held for a
    millisecond.
    """
    path = store_lock_path(uri)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no flock, MLflow's own retry is all there is
        fcntl = None  # type: ignore[assignment]
    if path is None or fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _make_client(uri: str) -> "MlflowClient":
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
            _CLIENTS[uri] = _make_client(uri)
        return _CLIENTS[uri]


def warm_up(settings: "MlflowParams", *, root: Path | None = None) -> threading.Thread | None:
    """Import mlflow and open the store in a background thread while the stage computes.

    ``evaluate`` and ``plots`` spend their time in torch/matplotlib code that
    releases the GIL; importing mlflow (~1-3 s) and opening the store overlap
    with it instead of following it. Errors are left for the real call to
    report (one line, as always); nothing is started when tracking is off.
    """
    if not settings.enabled:
        return None

    def work() -> None:
        with contextlib.suppress(Exception):
            client_for(preflight(settings, root=root).uri)  # type: ignore[union-attr]

    thread = threading.Thread(target=work, name="mlflow-warm-up", daemon=True)
    thread.start()
    return thread


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
                raise TrackingError(f"MLflow could not create experiment {name!r}: {_one_line(err.message)}") from None
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    if EXPERIMENT_KIND[0] not in experiment.tags:  # a kind the user chose stays
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def kill_stale_runs(client: "MlflowClient", experiment_id: str, host: str | None = None) -> list[str]:
    """Mark RUNNING runs whose process on this host is gone as KILLED; return their ids.

    A crashed or ``kill -9``-ed train leaves its runs RUNNING forever; runs of
    other hosts, or of live processes (a parallel queue worker), are left alone.
    """
    host = host or socket.gethostname()
    stale: list[str] = []
    runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        tags = run.data.tags
        pid = tags.get("cnnpipe.pid", "")
        if tags.get("cnnpipe.host") != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "failure_reason", f"stale: process {pid} on {host} is gone")
        client.set_terminated(run.info.run_id, "KILLED")
        stale.append(run.info.run_id)
    return stale


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


def dataset_input(name: str, digest: str, source: str) -> "DatasetInput":
    """The run's data as an MLflow dataset input: it fills the runs table's Dataset column.

    ``digest`` is the prepared data's fingerprint, so runs on different data
    are told apart at a glance; ``source`` says where it came from (the
    user's folder or URL, or the prepared folder). Plain entities, not
    ``mlflow.data`` (which imports pandas and reads the data): one
    ``log_inputs`` call per run.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return DatasetInput(Dataset(name=name, digest=digest[:36], source_type="local", source=json.dumps({"uri": source})),
                        tags=[InputTag("mlflow.data.context", "train")])


def open_tracker(settings: "MlflowParams", *, target: TrackingTarget | None = None, params: Mapping[str, Any] | None = None,
                 tags: Mapping[str, str] | None = None, root: Path | None = None,
                 dataset: tuple[str, str, str] | None = None) -> NullTracker:
    """Start this execution's parent run (kills stale runs of dead processes first).

    Returns a ``NullTracker`` (and imports nothing) when tracking is disabled.
    ``target`` comes from ``preflight``; without it the store is resolved and
    checked here. ``dataset`` (name, digest, source) is logged as the input of
    the parent and of every child (``dataset_input``).
    """
    if not settings.enabled:
        return NullTracker()
    if target is None:
        target = preflight(settings, root=root)
        assert target is not None
    from mlflow.exceptions import MlflowException

    base = context_tags()
    try:
        client = _make_client(target.uri)
        experiment_id = ensure_experiment(client, settings.experiment, target.artifact_location)
        stale = kill_stale_runs(client, experiment_id)
        run = client.create_run(
            experiment_id, run_name=parent_run_name(), tags={**base, **(tags or {}), ROLE: "parent"}
        )
    except MlflowException as err:
        raise TrackingError(f"MLflow store {target.uri} rejected the parent run: {_one_line(err.message)}; fix {target.origin} or set mlflow.enabled: false") from None
    except Exception as err:  # sqlalchemy/network errors surface as plain exceptions
        raise TrackingError(f"MLflow store {target.uri} is unusable ({type(err).__name__}: {_one_line(err)}); fix {target.origin} or set mlflow.enabled: false") from None
    tracker = MlflowTracker(
        uri=target.uri,
        experiment_id=experiment_id,
        parent_run_id=run.info.run_id,
        registered_model=settings.registered_model,
        base_tags=base,
        _client=client,
        keep_going=True,
        dataset=tuple(dataset) if dataset else None,
    )
    if stale:
        print(f"mlflow: marked {len(stale)} stale RUNNING run(s) of dead processes as KILLED", flush=True)
    if params:
        tracker._batch(tracker.parent_run_id, params=params)
    if tracker.dataset:
        tracker._call("log_inputs", client.log_inputs, tracker.parent_run_id, [dataset_input(*tracker.dataset)])
    return tracker


# --------------------------------------------------------------------------- later stages (evaluate, plots)


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
            raise TrackingError(f"MLflow store {target.uri} failed: {_one_line(err.message)}; fix {target.origin} or set mlflow.enabled: false") from None
        print(f"mlflow: run {run_id} is not in {target.uri} (trained against another store?); results not logged", flush=True)
        return False
    for run_id in run_ids:
        tracker._batch(run_id, metrics=metrics)
    for folder, paths in {artifact_path: list(files or []), **dict(artifacts or {})}.items():
        for path in paths:
            if Path(path).is_file():
                tracker._call("log_artifact", tracker.client.log_artifact, parent_run_id, str(path), folder)
    if settings.registered_model and weights_sha256:
        _tag_version(tracker, settings.registered_model, weights_sha256,
                     {**registry_metric_tags(metrics or {}), **(model_tags or {})})
    return True


def registry_metric_tags(metrics: Mapping[str, float]) -> dict[str, str]:
    from cnnpipe.serving.registry import version_tags

    return {key: value for key, value in version_tags({}, dict(metrics)).items() if key != "params"}


def _tag_version(tracker: MlflowTracker, name: str, weights_sha256: str, tags: Mapping[str, str]) -> None:
    """Add ``tags`` to the version of ``name`` whose weights are ``weights_sha256`` (if registered here)."""
    from mlflow.exceptions import MlflowException

    from cnnpipe.serving.registry import find_version

    try:
        version = find_version(tracker.client, name, weights_sha256)
    except MlflowException:
        version = None
    if version is None:
        print(f"mlflow: no version of {name} holds these weights; its tags are not updated", flush=True)
        return
    for key, value in tags.items():
        tracker._call("set_model_version_tag", tracker.client.set_model_version_tag, name, version.version, key, value)
