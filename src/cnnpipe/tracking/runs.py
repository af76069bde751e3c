"""The MLflow run lifecycle: a parent run per train execution, a nested child per trial.

``NullTracker`` (tracking off) and ``MlflowTracker`` offer the same calls, so
"tracking off" is one object, not an ``if`` in every function. A child run
is started, logged epoch by epoch, ended with its final metrics and
artifacts; after a kill, ``reopen_child`` continues the same child under the
new parent, and ``kill_stale_runs`` marks runs of dead processes KILLED. Every
call goes through ``tracking.calls`` (retries, Ctrl-C, one-line failures).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import math
import os
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnpipe import __version__
from cnnpipe.tracking.calls import CallPolicy
from cnnpipe.tracking.connection import TrackingTarget, ensure_experiment, make_client, preflight
from cnnpipe.util.errors import TrackingError
from cnnpipe.util.paths import work_dir
from cnnpipe.util.processes import pid_alive
from cnnpipe.util.text import one_line

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput

    from cnnpipe.params.sections import MlflowParams

MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
ROLE = "cnnpipe.role"


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


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:MAX_PARAM_CHARS]


def _finite_or_nan(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number



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

    def log_parent(self, *, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
                   tags: Mapping[str, str] | None = None, files: list[Path] | None = None,
                   table: "pd.DataFrame | None" = None) -> None:
        return None

    def log_to_runs(self, updates: Mapping[str, tuple[Mapping[str, float], Mapping[str, str]]]) -> None:
        return None

    def end_parent(self, status: str = "FINISHED", reason: str = "") -> None:
        return None

    @contextlib.contextmanager
    def running(self) -> Iterator["NullTracker"]:
        yield self



@dataclass
class MlflowTracker(NullTracker, CallPolicy):
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
            self._client = make_client(self.uri)
        return self._client

    # ----------------------------------------------------------- low level
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
            self.call("log_batch", self.client.log_batch, run_id, **entities)

    def _terminate(self, run_id: str, status: str) -> None:
        self.call("set_terminated", self.client.set_terminated, run_id, status)

    # ----------------------------------------------------------- children

    def start_child(self, name: str, *, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        """A nested run for one grid point; its params go in with the same call batch."""
        run_tags = {**self.base_tags, "cnnpipe.pid": str(os.getpid()), **tags,
                    "mlflow.parentRunId": self.parent_run_id, ROLE: "child"}
        run = self.call("create_run", self.client.create_run, self.experiment_id, run_name=name, tags=run_tags)
        if run is None:  # the store was lost (keep_going)
            return None
        run_id = run.info.run_id
        self._batch(run_id, params=params)
        if self.dataset:
            self.call("log_inputs", self.client.log_inputs, run_id, [dataset_input(*self.dataset)])
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
                                             or not pid.isdigit() or pid_alive(int(pid))):
            return None  # another live train (a parallel experiment) owns it: never take it over
        history = self.call("get_metric_history", self.client.get_metric_history, run_id, "val_loss") or []
        self.call("update_run", self.client.update_run, run_id, status="RUNNING")
        self._batch(run_id, tags={**tags, "mlflow.parentRunId": self.parent_run_id, "cnnpipe.pid": str(os.getpid())})
        return {int(metric.step) for metric in history}

    def log_epoch(self, run_id: str | None, step: int, metrics: Mapping[str, float]) -> None:
        if run_id:
            self._batch(run_id, metrics=metrics, step=step)

    def log_epochs(self, run_id: str | None, epochs: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        """Many epochs' metrics in one round-trip: a reused run's whole history (a call each: benchmarks/README.md)."""
        if not run_id or not epochs:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, _finite_or_nan(value), now, step) for step, values in epochs for key, value in values.items()]
        if metrics:
            self.call("log_batch", self.client.log_batch, run_id, metrics=metrics)

    def end_child(self, run_id: str | None, *, status: str, reason: str = "", metrics: Mapping[str, float] | None = None,
                  tags: Mapping[str, str] | None = None, texts: Mapping[str, str] | None = None,
                  files: list[Path] | None = None) -> None:
        """Final metrics, artifacts and the terminal status (FINISHED / FAILED / KILLED)."""
        if not run_id:
            return
        all_tags = dict(tags or {})
        if reason and status != "FINISHED":
            all_tags["failure_reason"] = one_line(reason, 5000)
        self._batch(run_id, metrics=metrics, tags=all_tags)
        for name, text in (texts or {}).items():
            self.call("log_text", self.client.log_text, run_id, text, name)
        for path in files or []:
            if Path(path).is_file():
                self.call("log_artifact", self.client.log_artifact, run_id, str(path))
        self._terminate(run_id, status)

    def log_parent(self, *, params: Mapping[str, Any] | None = None, metrics: Mapping[str, float] | None = None,
                   tags: Mapping[str, str] | None = None, files: list[Path] | None = None,
                   table: "pd.DataFrame | None" = None) -> None:
        self._batch(self.parent_run_id, params=params, metrics=metrics, tags=tags)
        for path in files or []:
            if Path(path).is_file():
                self.call("log_artifact", self.client.log_artifact, self.parent_run_id, str(path))
        if table is not None:
            self.call("log_table", self.client.log_table, self.parent_run_id, table, "grid_table.json")

    def log_to_runs(self, updates: Mapping[str, tuple[Mapping[str, float], Mapping[str, str]]]) -> None:
        """Metrics and tags added to finished runs (run id -> (metrics, tags)): what is known once the search ends."""
        for run_id, (metrics, tags) in updates.items():
            self._batch(run_id, metrics=metrics, tags=tags)

    def end_parent(self, status: str = "FINISHED", reason: str = "") -> None:
        if not self._parent_open:
            return
        if reason and status != "FINISHED":
            self._batch(self.parent_run_id, tags={"failure_reason": one_line(reason, 5000)})
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
        if tags.get("cnnpipe.host") != host or not pid.isdigit() or pid_alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, "failure_reason", f"stale: process {pid} on {host} is gone")
        client.set_terminated(run.info.run_id, "KILLED")
        stale.append(run.info.run_id)
    return stale


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
        client = make_client(target.uri)
        experiment_id = ensure_experiment(client, settings.experiment, target.artifact_location)
        stale = kill_stale_runs(client, experiment_id)
        run = client.create_run(
            experiment_id, run_name=parent_run_name(), tags={**base, **(tags or {}), ROLE: "parent"}
        )
    except MlflowException as err:
        raise TrackingError(f"MLflow store {target.uri} rejected the parent run: {one_line(err.message)}; fix {target.origin} or set mlflow.enabled: false") from None
    except Exception as err:  # sqlalchemy/network errors surface as plain exceptions
        raise TrackingError(f"MLflow store {target.uri} is unusable ({type(err).__name__}: {one_line(err)}); fix {target.origin} or set mlflow.enabled: false") from None
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
        tracker.call("log_inputs", client.log_inputs, tracker.parent_run_id, [dataset_input(*tracker.dataset)])
    return tracker


