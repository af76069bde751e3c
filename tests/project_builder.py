"""Temp projects for end-to-end tests, built from this repository's own files.

Two layouts, shared by every test that drives real commands:

* ``pipeline_project``: this project's ``dvc.yaml``, ``params.yaml`` (shrunk to
  tiny runs), ``stages/``, ``src/``, ``dvc_plots/``, ``.dvc/config`` and
  ``.gitignore`` in a fresh git + DVC repo whose raw data comes from a
  loopback mirror (``data.mirrors`` + ``data.checksums``). ``commit=True``
  makes the first commit ``dvc exp`` needs; queued experiments copy only
  git-tracked files, so everything a stage imports must be committed.
* ``stage_project``: ``stages/train.py`` and a synthetic ``data/prepared`` in
  ``work/``, with ``$DVC_ROOT`` pointing at a separate ``root/`` -- the layout
  of a queued experiment -- for tests that run stage scripts directly.

Subprocesses get a clean environment (no inherited ``DVC_*``,
``MLFLOW_TRACKING_URI``, proxies or ``CNNPIPE_DEBUG``) and this venv's
``bin`` first on ``PATH``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from synthetic import TINY

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")
PROXY_VARS = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")
GIT_IDENTITY = ["-c", "user.name=cnnpipe-tests", "-c", "user.email=tests@localhost", "-c", "commit.gpgsign=false"]


# --------------------------------------------------------------------------- running commands


def clean_env(project: Path | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a user's shell would have: this venv on PATH, nothing test-specific inherited.

    With ``project``, ``PYTHONPATH`` points at its ``src/`` so stages import
    the copy under test (a queued experiment's temp copy has the same files).
    """
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DVC_") and k not in ("MLFLOW_TRACKING_URI", "CNNPIPE_DEBUG", *PROXY_VARS)}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1",
               MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="true", no_proxy="127.0.0.1,localhost",
               NO_PROXY="127.0.0.1,localhost", GIT_TERMINAL_PROMPT="0")
    if project is not None:
        env["PYTHONPATH"] = str(project / "src")
    env.update(extra or {})
    return env


def run(args: Sequence[str], cwd: Path, timeout: float = 300, env: Mapping[str, str] | None = None,
        project: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command in ``cwd`` with ``clean_env`` (``project`` defaults to ``cwd``)."""
    return subprocess.run(list(args), cwd=cwd, env=clean_env(project or cwd, env), capture_output=True,
                          text=True, timeout=timeout)


def run_ok(args: Sequence[str], cwd: Path, timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """``run`` that fails the test with the command's output tail when it exits non-zero."""
    done = run(args, cwd, timeout, **kwargs)
    assert done.returncode == 0, f"{' '.join(args)} -> {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def git(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_ok(["git", *GIT_IDENTITY, *args], cwd)


def commit_all(project: Path, message: str) -> str:
    """``git add -A`` + commit (a temp repo only); returns the new HEAD."""
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", message)
    return git(project, "rev-parse", "HEAD").stdout.strip()


# --------------------------------------------------------------------------- the whole pipeline


def tiny_pipeline_params(mirror: str, checksums: Mapping[str, str]) -> dict[str, Any]:
    """This project's params.yaml with the data from ``mirror`` and a 2-run, 1-epoch grid."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params.update({"model": "fashion_tutorial", "lr": [0.01, 0.003], "batch_size": 50, "epochs": 1, "patience": 1})
    params["data"].update({"dataset": "mnist", "mirrors": [mirror], "checksums": dict(checksums)})
    params["eval"].update({"batch_size": 100, "mistakes": 6})
    params["mlflow"].update({"log_layer_stats": False, "registered_model": None})
    params["grid"].update({"workers": 1, "cache": False})
    return params


def pipeline_project(folder: Path, mirror: str, checksums: Mapping[str, str], *,
                     params: Mapping[str, Any] | None = None, commit: bool = False,
                     extra: Sequence[str] = ()) -> Path:
    """This project's pipeline in a fresh git + DVC repo (see the module docstring).

    ``params`` replaces top-level keys of ``tiny_pipeline_params``; ``extra``
    names more repository paths to copy (e.g. ``scripts``).
    """
    folder.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, folder / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "index.html", "static")
    for name in ("stages", "dvc_plots", "src", *extra):
        shutil.copytree(ROOT / name, folder / name, ignore=ignore)
    run_ok(["git", "init", "-q"], folder)
    run_ok([DVC, "init", "-q"], folder)
    shutil.copy(ROOT / ".dvc" / "config", folder / ".dvc" / "config")  # plots.html_template
    shutil.copytree(ROOT / ".dvc" / "plots", folder / ".dvc" / "plots")  # custom plot templates
    values = tiny_pipeline_params(mirror, checksums)
    values.update(params or {})
    (folder / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    if commit:
        commit_all(folder, "cnnpipe pipeline (tiny params)")
    return folder


# --------------------------------------------------------------------------- one stage, queued-experiment layout


def write_params(work: Path, **changes: Any) -> None:
    """Tiny train-stage params (a 2-run lr grid of the TINY model) plus ``changes``."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.update({"model": "tiny", "models": {"tiny": TINY}, "lr": [0.05, 0.01], "batch_size": 64, "epochs": 2})
    raw.update(changes)
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def stage_project(base: Path, *, stages: Sequence[str] = ("train",), n_test: int = 20, **changes: Any) -> tuple[Path, Path]:
    """``work/`` (stages, params.yaml, synthetic data/prepared) and an empty ``root/`` (``$DVC_ROOT``)."""
    from synthetic import make_prepared

    work, root = base / "work", base / "root"
    (work / "stages").mkdir(parents=True)
    root.mkdir()
    for stage in stages:
        shutil.copy(ROOT / "stages" / f"{stage}.py", work / "stages" / f"{stage}.py")
    make_prepared(work / "data" / "prepared", n_train=300, n_val=100, n_test=n_test)
    write_params(work, **changes)
    return work, root


def run_stage(work: Path, root: Path, *extra_args: str, env: dict[str, str] | None = None,
              stage: str = "train") -> subprocess.CompletedProcess[str]:
    """``python stages/<stage>.py`` in ``work`` as DVC runs it, with ``$DVC_ROOT=root``."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "CNNPIPE_DEBUG", "DVC_EXP_NAME")}
    full_env.update({"DVC_ROOT": str(root), "DVC_STAGE": stage, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})})
    return subprocess.run([sys.executable, *extra_args, f"stages/{stage}.py"], cwd=work, env=full_env,
                          capture_output=True, text=True, timeout=600)


# Historical name used by tests/test_train_stage.py.
make_project = stage_project


# --------------------------------------------------------------------------- params a stage reads


def recorded_reads(folder: Path) -> dict[str, set[str]]:
    """Stage -> the params keys its processes read (``CNNPIPE_RECORD_PARAMS=folder``, ``cnnpipe.params.reads``)."""
    import json

    out: dict[str, set[str]] = {}
    for path in folder.glob("*.json"):
        stage = path.stem.rsplit("-", 1)[0]
        out.setdefault(stage, set()).update(json.loads(path.read_text()))
    return out


def assert_reads_declared(project: Path, folder: Path) -> dict[str, set[str]]:
    """Every params key a stage read is declared in its ``dvc.yaml`` params (a key covers every key below it)."""
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    reads = recorded_reads(folder)
    assert reads, f"nothing recorded in {folder}"
    for stage, keys in reads.items():
        declared = [str(p) for p in stages[stage].get("params", [])]
        undeclared = sorted(k for k in keys if not any(k == d or k.startswith(d + ".") for d in declared))
        assert not undeclared, f"stage {stage} reads {undeclared} but dvc.yaml does not declare them"
    return reads
