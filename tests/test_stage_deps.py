"""Each stage depends on what it runs and no more; a module it runs but does not declare stops it at its start.

Every fact here is derived from the import closures (``codegraph``), never
from a list of files: the package folders ``dvc.yaml`` declares per stage,
which stages an edit reruns, and the size of each stage's closure.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cnnpipe.codegraph import code_identity as ci
from cnnpipe.codegraph import stage_deps as sd
from cnnpipe.util.errors import CnnpipeError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cnnpipe"
DVC_YAML = ROOT / "dvc.yaml"
SCRIPTS = sd.stage_scripts(DVC_YAML)
DECLARED = sd.declared_deps(DVC_YAML)


def closure_modules(stage: str) -> set[str]:
    return set(ci.closure((), PACKAGE, scripts=[ROOT / SCRIPTS[stage]]))


def rerun_by(path: Path) -> set[str]:
    """The stages DVC reruns when ``path`` is edited: those whose declared deps cover it."""
    relative = path.relative_to(ROOT).as_posix()
    return {stage for stage, deps in DECLARED.items() if not sd.uncovered([relative], deps)}


def test_every_script_stage_declares_exactly_its_derived_code_deps() -> None:
    assert set(SCRIPTS) == {"download", "prepare", "weights", "train", "evaluate", "plots"}
    for stage, script in SCRIPTS.items():
        code = [d for d in DECLARED[stage] if d.startswith("src/")]
        assert code == sd.code_deps(ROOT / script, ROOT), f"{stage}: run `{sd.WRITE_COMMAND}`"
        assert script in DECLARED[stage]


def test_every_module_a_stage_runs_is_covered_by_its_declared_deps() -> None:
    for stage, script in SCRIPTS.items():
        files = [p.relative_to(ROOT).as_posix() for p in ci.stage_code_files(ROOT / script, PACKAGE)]
        assert not sd.uncovered(files, DECLARED[stage]), stage


def test_the_pipeline_file_stays_short_enough_to_read() -> None:
    assert len(DVC_YAML.read_text().splitlines()) <= 150


def test_the_closure_targets_hold() -> None:
    weights = closure_modules("weights")
    assert len(weights) <= 40, len(weights)
    assert not {m for m in weights if m.startswith(("cnnpipe.engine", "cnnpipe.search", "cnnpipe.compute"))}
    assert "cnnpipe.tracking.runs" not in weights
    assert len(closure_modules("evaluate")) <= 60
    assert len(closure_modules("plots")) <= 50
    for stage in ("download", "prepare"):
        assert not {m for m in closure_modules(stage) if m.startswith("cnnpipe.models")}, stage


@pytest.mark.parametrize("module", sorted((PACKAGE / "engine").glob("*.py")), ids=lambda p: p.name)
def test_editing_the_engine_never_reruns_download_prepare_weights_or_plots(module: Path) -> None:
    assert rerun_by(module) & {"download", "prepare", "weights", "plots"} == set()
    assert "train" in rerun_by(module)


def drawing_modules() -> list[Path]:
    """The modules that draw the report figures (the plots stage's own package)."""
    folder = PACKAGE / "figures"
    return sorted(folder.glob("*.py")) if folder.is_dir() else [PACKAGE / "reports" / "figures.py"]


@pytest.mark.parametrize("module", drawing_modules(), ids=lambda p: p.name)
def test_editing_the_figures_reruns_only_plots(module: Path) -> None:
    assert rerun_by(module) == {"plots"}


@pytest.mark.parametrize("module", sorted((PACKAGE / "models").glob("*.py")), ids=lambda p: p.name)
def test_editing_the_model_code_never_reruns_download_or_prepare(module: Path) -> None:
    assert rerun_by(module) & {"download", "prepare"} == set()


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A copy of the project's dvc.yaml, stages/ and src/ (what the check reads)."""
    shutil.copy(DVC_YAML, tmp_path / "dvc.yaml")
    shutil.copytree(ROOT / "stages", tmp_path / "stages")
    shutil.copytree(PACKAGE, tmp_path / "src" / "cnnpipe", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_a_module_in_a_package_the_stage_does_not_declare_stops_it(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = project / "src" / "cnnpipe"
    monkeypatch.setattr(sd, "package_root", lambda: root)
    sd.check_code_deps(project / "stages" / "evaluate.py", project)  # as shipped: nothing missing
    (root / "evaluation" / "scale.py").write_text("FACTOR = 1.0\n")
    score = root / "evaluation" / "score.py"
    score.write_text(score.read_text() + "\n\ndef _factor() -> float:\n    from cnnpipe.evaluation.scale import FACTOR\n"
                     "    return FACTOR\n")
    sd.check_code_deps(project / "stages" / "evaluate.py", project)  # a new module in a declared package: covered
    score.write_text(score.read_text() + "\n\ndef _rows() -> object:\n    from cnnpipe.reports import train_files\n"
                     "    return train_files\n")
    with pytest.raises(CnnpipeError) as refused:
        sd.check_code_deps(project / "stages" / "evaluate.py", project)
    line = str(refused.value)
    assert "\n" not in line and "stage evaluate runs src/cnnpipe/reports/" in line and sd.WRITE_COMMAND in line

    assert "evaluate" in sd.write_stage_deps(project / "dvc.yaml", root)
    assert "src/cnnpipe/reports" in sd.declared_deps(project / "dvc.yaml")["evaluate"]
    sd.check_code_deps(project / "stages" / "evaluate.py", project)  # fixed by the command the line names
    assert sd.write_stage_deps(project / "dvc.yaml", root) == []  # and written once


def test_writing_keeps_every_other_line_and_the_data_deps(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = project / "src" / "cnnpipe"
    monkeypatch.setattr(sd, "package_root", lambda: root)
    before = (project / "dvc.yaml").read_text()
    stale = before.replace(", src/cnnpipe/engine", "", 1)
    (project / "dvc.yaml").write_text(stale)
    assert sd.write_stage_deps(project / "dvc.yaml", root)
    assert (project / "dvc.yaml").read_text() == before
    for stage, deps in sd.declared_deps(project / "dvc.yaml").items():
        assert [d for d in deps if not d.startswith("src/")] == [d for d in DECLARED[stage] if not d.startswith("src/")]


def test_no_check_outside_a_project_or_for_a_script_no_stage_runs(tmp_path: Path) -> None:
    sd.check_code_deps(ROOT / "stages" / "train.py", tmp_path)  # no dvc.yaml there
    sd.check_code_deps(ROOT / "benchmarks" / "bench_engine.py", ROOT)  # no stage runs it
