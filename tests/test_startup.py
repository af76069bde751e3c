"""Lean start-up: commands import only what they use.

torch (~2.5 s) and mlflow (~3.3 s) dominate start-up. ``cnnpipe --help`` and
``cnnpipe validate`` must import neither; every stage answers ``--help``
before any heavy import; the download and prepare stages never import mlflow
(nor torch). Asserted on the set of modules a real subprocess imported
(``python -X importtime``), never on timings.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = tuple(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])  # every stage of the pipeline
HEAVY = {"torch", "mlflow"}
IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s+([\w.]+)\s*$", re.MULTILINE)


def imported(args: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run ``python -X importtime ARGS``; return the process and the top-level packages it imported."""
    env = {k: v for k, v in os.environ.items() if k != "CNNPIPE_DEBUG"}
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    packages = {name.split(".")[0] for name in IMPORT_LINE.findall(proc.stderr)}
    assert "cnnpipe" in packages or args[0].startswith("stages/"), proc.stderr[-2000:]
    return proc, packages


def test_cnnpipe_help_imports_neither_torch_nor_mlflow():
    proc, packages = imported(["-m", "cnnpipe", "--help"], ROOT)
    assert proc.returncode == 0 and "usage: cnnpipe" in proc.stdout
    assert packages & HEAVY == set()


def test_cnnpipe_validate_imports_neither_torch_nor_mlflow():
    proc, packages = imported(["-m", "cnnpipe", "validate"], ROOT)
    assert proc.returncode == 0 and "params.yaml: ok" in proc.stdout, proc.stderr[-2000:]
    assert {"cnnpipe", "yaml", "pydantic"} <= packages
    assert packages & HEAVY == set()


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_answers_help_before_heavy_imports(stage):
    proc, packages = imported([f"stages/{stage}.py", "--help"], ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: stages/{stage}.py")
    assert packages & (HEAVY | {"pandas", "matplotlib", "numpy"}) == set()


def test_download_and_prepare_stages_never_import_mlflow_or_torch(tmp_path):
    from fixtures_raw import make_idx_raw

    fixture = make_idx_raw(tmp_path / "mirror", n_train=40, n_test=20)
    project = tmp_path / "project"
    (project / "stages").mkdir(parents=True)
    for stage in ("download", "prepare"):
        shutil.copy(ROOT / "stages" / f"{stage}.py", project / "stages")
    params = {"data": {"dataset": "kmnist", "mirrors": ["../mirror"], "checksums": fixture.checksums}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("download", "prepare"):
        proc, packages = imported([f"stages/{stage}.py"], project)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert f"{stage}: kmnist" in proc.stdout
        assert "cnnpipe" in packages and packages & HEAVY == set(), f"{stage} imported {packages & HEAVY}"
    assert (project / "data" / "prepared" / "stats.json").is_file()
