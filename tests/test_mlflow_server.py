"""The MLflow store a real train stage wrote, served over HTTP: ``mlflow server`` and ``cnnpipe ui``.

One tiny train (2-run lr grid, 2 epochs, MLflow on, named like a DVC
experiment) writes ``root/mlflow.db``. A server is started on a free
loopback port in its own process group, waited for (``/health``), checked
over the REST API a browser or a remote client would use, and its whole group
is always stopped. One ``cnnpipe ui`` (``project_ui``: seconds of imports and
start-up on 2 cores) serves two tests in file order: the first reads what it
serves, the second stops it with ``kill PID``; a test that finds it gone
(another order, a test run alone) starts a fresh one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from project_builder import BIN, clean_env, run_stage, stage_project

pytestmark = [pytest.mark.slow, pytest.mark.long(35)]

EXP_NAME = "exp-served"
HEALTH_DEADLINE_S = 180  # ~25 s on an idle laptop; generous for a loaded CI box


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(work, root): reports in ``work/reports``, the MLflow store in ``root/mlflow.db``."""
    work, root = stage_project(tmp_path_factory.mktemp("served"))
    done = run_stage(work, root, env={"DVC_EXP_NAME": EXP_NAME})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (root / "mlflow.db").is_file()
    return work, root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(command: list[str], cwd: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run a server in its own process group (mlflow forks workers); kill the group however the test ends."""
    with open(log, "wb") as sink:
        proc = subprocess.Popen(command, cwd=cwd, env=clean_env(), stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue


def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + HEALTH_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200 and response.read().strip() == b"OK":
                    return
        time.sleep(0.5)
    pytest.fail(f"{base}/health did not answer within {HEALTH_DEADLINE_S} s:\n{log.read_text(errors='replace')[-3000:]}")


def api(base: str, path: str, body: dict[str, Any] | None = None, **query: Any) -> dict[str, Any]:
    """One MLflow REST call (GET with query, or POST with a JSON body)."""
    url = f"{base}/api/2.0/mlflow/{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def tags_of(run: dict[str, Any]) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metrics_of(run: dict[str, Any]) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


def params_of(run: dict[str, Any]) -> dict[str, str]:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def test_mlflow_server_lists_parent_children_and_metric_history(store: tuple[Path, Path], tmp_path: Path) -> None:
    work, root = store
    train = json.loads((work / "reports" / "train.json").read_text())
    history = pd.read_csv(work / "reports" / "history.csv", dtype={"run_id": str})
    grid = pd.read_csv(work / "reports" / "grid.csv", dtype={"run_id": str, "mlflow_run_id": str})
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--default-artifact-root", str(root / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    log = tmp_path / "server.log"
    with serving(command, root, log) as proc:
        wait_healthy(base, proc, log)
        experiment = api(base, "experiments/get-by-name", experiment_name="cnnpipe")["experiment"]
        assert experiment["experiment_id"] == train["mlflow_experiment_id"]
        runs = api(base, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]

        parents = [r for r in runs if tags_of(r).get("cnnpipe.role") == "parent"]
        assert [p["info"]["run_id"] for p in parents] == [train["mlflow_parent_run_id"]]
        parent = parents[0]
        assert parent["info"]["run_name"] == EXP_NAME and parent["info"]["status"] == "FINISHED"
        assert tags_of(parent)["dvc.exp_name"] == EXP_NAME
        assert metrics_of(parent)["best_val_loss"] == pytest.approx(train["val_loss"])
        assert json.loads(params_of(parent)["lr"]) == [0.05, 0.01]  # the grid axis, as the parent's param

        children = {r["info"]["run_id"]: r for r in runs if tags_of(r).get("mlflow.parentRunId") == train["mlflow_parent_run_id"]}
        assert set(children) == set(grid["mlflow_run_id"]) and len(children) == 2
        for row in grid.itertuples():
            child = children[row.mlflow_run_id]
            assert child["info"]["run_name"] == row.run_name and child["info"]["status"] == "FINISHED"
            assert float(params_of(child)["lr"]) == row.lr
            assert metrics_of(child)["best_val_loss"] == pytest.approx(row.val_loss)
            points = api(base, "metrics/get-history", run_id=row.mlflow_run_id, metric_key="val_loss")["metrics"]
            expected = history[history["run_id"] == row.run_id]
            assert sorted(p["step"] for p in points) == expected["epoch"].tolist() == [1, 2]
            by_step = {p["step"]: p["value"] for p in points}
            assert [by_step[e] for e in expected["epoch"]] == pytest.approx(expected["val_loss"].tolist(), rel=1e-5)
    assert proc.poll() is not None  # the whole group is gone


@dataclass
class Ui:
    proc: subprocess.Popen[bytes]
    base: str
    log: Path


@pytest.fixture(scope="module")
def project_ui(store: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Ui]]:
    """``cnnpipe ui`` in the project root (the folder holding the store), shared by the module's ``cnnpipe ui`` tests.

    Call it for the running one; it starts one (and waits for ``/health``)
    when none is running yet or the last one was stopped. Every one started
    is stopped with its whole group at the end, and must then be gone.
    """
    work, root = store
    shutil.copy(work / "params.yaml", root / "params.yaml")  # run from the folder holding the store
    (root / "dvc.yaml").write_text("stages: {}\n")  # project_root() finds the repo by its dvc.yaml
    folder = tmp_path_factory.mktemp("ui")
    started: list[Ui] = []
    with contextlib.ExitStack() as stack:
        def running_ui() -> Ui:
            if started and started[-1].proc.poll() is None:
                return started[-1]
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            log = folder / f"ui-{len(started)}.log"
            proc = stack.enter_context(serving([str(BIN / "cnnpipe"), "ui", "--port", str(port)], root, log))
            wait_healthy(base, proc, log)
            started.append(Ui(proc, base, log))
            return started[-1]

        yield running_ui
    assert all(ui.proc.poll() is not None for ui in started)  # stopped with its group


def test_cnnpipe_ui_serves_the_project_store(store: tuple[Path, Path], project_ui: Callable[[], Ui]) -> None:
    """``cnnpipe ui`` in the project root: prints the URL, serves the root's mlflow.db, stops with its group."""
    work, root = store
    train = json.loads((work / "reports" / "train.json").read_text())
    ui = project_ui()
    base = ui.base
    first = ui.log.read_text().splitlines()[0]
    assert first.startswith(f"MLflow UI for sqlite:///{root / 'mlflow.db'}: {base}/#/experiments/"
                            f"{train['mlflow_experiment_id']}?workflowType=machine_learning ")
    runs = api(base, "runs/search", {"experiment_ids": [train["mlflow_experiment_id"]]})["runs"]
    assert train["mlflow_parent_run_id"] in {r["info"]["run_id"] for r in runs}
    with urllib.request.urlopen(f"{base}/", timeout=30) as page:
        assert b"<html" in page.read(4096).lower()  # the UI itself, not just the API
    # (stopped with its group: project_ui's teardown asserts it; `kill PID` alone: the next test)


def process_tree(pid: int) -> set[int]:
    """``pid`` and every descendant, read from /proc (snapshot: taken before anything is killed)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            if entry.name.isdigit():
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = set(), [pid]
    while todo:
        tree.add(current := todo.pop())
        todo += children.get(current, [])
    return tree


def running(pid: int) -> bool:
    """Alive and not a zombie (an exited child that nobody reaped yet is gone for our purpose)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_of_cnnpipe_ui_stops_every_process_it_started(project_ui: Callable[[], Ui]) -> None:
    """``kill PID`` (SIGTERM) of ``cnnpipe ui`` ends mlflow ui, its uvicorn workers and job consumers too.

    The module's ``cnnpipe ui`` (the one the test above read, or a fresh one): its pid is the cnnpipe process.
    """
    ui = project_ui()
    proc, port = ui.proc, int(ui.base.rsplit(":", 1)[1])
    tree = process_tree(proc.pid)
    assert len(tree) >= 3, tree  # cnnpipe, mlflow ui, its server (and job consumers)
    os.kill(proc.pid, signal.SIGTERM)  # the pid alone, as `kill PID` does: not its group
    assert proc.wait(timeout=60) == 0
    deadline = time.monotonic() + 30
    while (alive := sorted(p for p in tree if running(p))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive == [], [Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in alive if running(p)]
    with pytest.raises(OSError):  # nothing serves the port any more
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
