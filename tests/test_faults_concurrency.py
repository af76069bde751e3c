"""Two ``dvc queue`` workers writing one SQLite MLflow store at the same time; a stuck queue recovering.

A 2-experiment sweep (``-S lr=...``) is queued and run by ``dvc queue start
-j 2``. The experiments reproduce the ``train`` stage (``dvc exp run --queue
train``: every promise here is about train's runs in the store; evaluate and
plots would only add two stage processes per experiment). Every experiment's
train has its own 2-run grid (``seed: [1, 2]``),
so both workers create, log and end runs in the repository-root
``mlflow.db`` concurrently. Promised: both experiments succeed, the root
store has a parent run named after each with 2 FINISHED children, and no
worker log mentions ``database is locked``. The workers
run with ``CNNPIPE_TAKE_TURNS=0``: by default concurrent trains take turns
(``compute.turns``), which would serialize the two searches and their
writes. Children of the two experiments are open in the store at the same
time by construction, not by luck of the machine's load: the temp project's
train command runs ``stages/train.py`` through ``overlap_gate.py`` (a test
helper), whose stdout holds the first per-epoch line of each experiment --
printed right after that epoch was logged to its open child -- until both
experiments have reached that line. The test then checks in the store that
the children's open spans really overlapped, written by two processes.

Then, in the same project (one baseline for both promises), the stuck state
DVC's Celery queue sometimes leaves (seen with ``-j 1`` and two
experiments) is made deterministically: the workers are ended and a third
experiment is queued with no worker alive. Promised (README, "A stuck
queue"): ``dvc queue status`` shows it ``Queued``; ``dvc queue start -j 1``
again runs it to Success without rerunning the first two, and the root store
holds exactly one parent run per experiment.
(``test_exp_workflows.py`` covers the DVC <-> MLflow links.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fixtures_raw import make_idx_raw, serve
from project_builder import DVC, TINY, clean_env, commit_all, pipeline_project, run, run_ok

pytestmark = [pytest.mark.slow, pytest.mark.long(100)]  # one project, queue after queue

SAFETY_S = 900  # a safety net only
STATUS_EVERY_S = 30  # start_and_drain asks dvc at least this often, whatever the refs say
GATE = Path(__file__).resolve().parent / "overlap_gate.py"  # copied into the project: train runs through it
TRAIN_CMD = "cmd: python stages/train.py\n"


def queue_status(project: Path) -> str:
    return run_ok([DVC, "queue", "status"], project, timeout=120).stdout


def settled(project: Path, names: tuple[str, ...]) -> bool:
    """Every experiment in ``names`` has its result ref, or one failed: time to ask ``dvc queue status``.

    A cheap look at git refs (DVC writes ``refs/exps/<baseline>/<name>`` for a
    successful experiment and ``refs/exps/celery/failed`` for a failed one),
    so the poll does not run a ``dvc`` process every two seconds: on 2 cores
    that took CPU from the workers it was waiting for. It only decides when
    to look; what the test asserts is ``dvc queue status``'s answer.
    """
    refs = run_ok(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], project).stdout.split()
    done = {ref.rsplit("/", 1)[-1] for ref in refs if not ref.startswith("refs/exps/celery/")}
    return set(names) <= done or "refs/exps/celery/failed" in refs


def start_and_drain(project: Path, jobs: int, names: tuple[str, ...], env: dict[str, str] | None = None) -> str:
    """``dvc queue start -j N``, then poll ``dvc queue status`` until nothing is Queued or Running.

    The README's way. Not ``dvc exp run --run-all``: that waits for every
    worker to exit, and under load DVC's worker monitor can miss its own
    shutdown (its 1 s inspect times out, the shutdown message is lost), so a
    worker idles on forever after every experiment is Success
    (treeverse/dvc#10398). The workers inherit the caller's stdout/stderr:
    with pipes, waiting for their EOF would wait for them to idle out.
    ``dvc queue status`` is asked once ``settled`` says ``names`` are done
    (and at least every ``STATUS_EVERY_S`` in case something else happened).
    Returns the last status; ``stop_leftover_workers`` ends what is left.
    """
    started = subprocess.run([DVC, "queue", "start", "-j", str(jobs)], cwd=project, env=clean_env(project, env),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    assert started.returncode == 0
    deadline = time.monotonic() + SAFETY_S
    while True:
        ask_at = time.monotonic() + STATUS_EVERY_S
        while time.monotonic() < ask_at and not settled(project, names):
            time.sleep(0.5)
        if not re.search(r"\b(Queued|Running)\b", status := queue_status(project)):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(1)


def stop_leftover_workers(project: Path) -> None:
    """A drained worker can idle on for minutes after ``dvc queue stop``: end it with the test."""
    for pid_file in (project / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text().strip())
            if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():  # not a recycled pid
                os.kill(pid, signal.SIGKILL)


def queue(project: Path, *sets: str) -> list[str]:
    """``dvc exp run --queue train -S ...`` (train and the stages before it); the names it queued."""
    out = run_ok([DVC, "exp", "run", "--queue", *(a for s in sets for a in ("-S", s)), "train"], project).stdout
    return re.findall(r"Queued experiment '([\w-]+)' for future execution", out)


def test_two_queue_workers_share_the_root_sqlite_store_and_a_stuck_queue_recovers(tmp_path: Path) -> None:
    raw = make_idx_raw(tmp_path / "www", n_train=200, n_test=40)
    with contextlib.contextmanager(serve)(raw.folder) as server:
        project = pipeline_project(tmp_path / "repo", server.url, raw.checksums,
                                   params={"model": "tiny", "models": {"tiny": TINY}, "lr": 0.02,
                                           "batch_size": 50, "epochs": 2, "patience": 2, "seed": [1, 2]})
        # The overlap by construction: train runs through the gate (a plain run of it without OVERLAP_GATE_DIR).
        shutil.copy(GATE, project / GATE.name)
        dvc_yaml = (project / "dvc.yaml").read_text()
        assert dvc_yaml.count(TRAIN_CMD) == 1
        (project / "dvc.yaml").write_text(dvc_yaml.replace(TRAIN_CMD, f"cmd: python {GATE.name} stages/train.py\n"))
        commit_all(project, "cnnpipe pipeline (tiny params), train through the overlap gate")
        gate = tmp_path / "gate"
        run_ok([DVC, "repro", "train"], project, timeout=SAFETY_S)  # the experiments reproduce train only
        baseline_parent = json.loads((project / "reports" / "train.json").read_text())["mlflow_parent_run_id"]
        commit_all(project, "baseline")
        try:
            names = queue(project, "lr=0.01,0.003")  # not the baseline's 0.02: both train
            assert len(names) == 2, names
            # No turns: truly concurrent (and a turn held by one gated train would stop the other before its gate).
            status = start_and_drain(project, jobs=2, names=tuple(names),
                                     env={"CNNPIPE_TAKE_TURNS": "0", "OVERLAP_GATE_DIR": str(gate),
                                          "OVERLAP_GATE_PARTIES": "2"})
            logs = {name: run_ok([DVC, "queue", "logs", name], project).stdout for name in names}
            # The stuck state (README, "A stuck queue"): the workers are gone and an experiment waits.
            stop_leftover_workers(project)
            (waiting,) = queue(project, "lr=0.001")
            time.sleep(3)
            stuck = queue_status(project)
            assert re.search(rf"\b{waiting}\s+.*\bQueued\b", stuck), stuck
            recovered = start_and_drain(project, jobs=1, names=(waiting,))  # the recovery the README gives
        finally:
            run([DVC, "queue", "stop"], project, timeout=120)
            stop_leftover_workers(project)

    for name in names:
        assert re.search(rf"\b{name}\s+.*\bSuccess\b", status), status
        assert logs[name].count("Running stage 'train'") == 1, logs[name][-2000:]
        assert "is cached - skipping run" not in logs[name], logs[name][-2000:]
        assert "database is locked" not in logs[name].lower(), logs[name][-3000:]
        assert "overlap gate: all 2 experiments' children are open" in logs[name], logs[name][-3000:]
    assert sorted(p.name for p in gate.iterdir()) == sorted(names)  # each train went through the gate
    for name in (*names, waiting):
        assert re.search(rf"\b{name}\s+.*\bSuccess\b", recovered), recovered

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnnpipe")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parent_runs = [r for r in runs if r.data.tags.get("cnnpipe.role") == "parent"]
    # One parent per experiment: the recovery ran the waiting one and did not rerun the other two.
    assert sorted(r.data.tags.get("dvc.exp_name") for r in parent_runs
                  if r.data.tags.get("dvc.exp_name") in (*names, waiting)) == sorted((*names, waiting))
    parents = {r.data.tags["dvc.exp_name"]: r for r in parent_runs if r.data.tags.get("dvc.exp_name") in names}
    lrs = set()
    for name, parent in parents.items():
        assert parent.info.status == "FINISHED" and parent.info.run_name == name
        assert parent.info.run_id != baseline_parent
        assert parent.info.artifact_uri.startswith(str(project / "mlartifacts"))  # the root store's artifacts
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert sorted(c.data.params["seed"] for c in children) == ["1", "2"]
        assert {c.info.status for c in children} == {"FINISHED"}
        assert all("val_loss" in c.data.metrics for c in children)
        lrs.add(children[0].data.params["lr"])
    assert lrs == {"0.01", "0.003"}
    # The writes really overlapped (the gate's construction, seen in the store): a child of one experiment
    # started while a child of the other was open, and two processes wrote them.
    spans = [(parent, c.info.start_time, c.info.end_time) for parent in parents
             for c in runs if c.data.tags.get("mlflow.parentRunId") == parents[parent].info.run_id]
    overlapping = {(a, b) for a, a_start, a_end in spans for b, b_start, b_end in spans
                   if a < b and a_start < b_end and b_start < a_end}
    assert overlapping, sorted(spans, key=lambda span: span[1])
    writers = {name: {c.data.tags.get("cnnpipe.pid") for c in runs
                      if c.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
               for name, parent in parents.items()}
    assert all(len(pids) == 1 for pids in writers.values()) and len(set().union(*writers.values())) == 2, writers
    strays = [p for p in (project / ".dvc" / "tmp" / "exps").rglob("*")
              if p.name in ("mlflow.db", "mlruns", "mlartifacts", ".cnnpipe-cache")]
    assert strays == []  # nothing landed in an experiment's temp copy
