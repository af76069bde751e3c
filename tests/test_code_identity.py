"""Stored results and stage deps key on the code that computes them, derived from the import graph.

The bug this guards against: evaluate's stored reports were keyed on a
hand-kept list of source files that missed ``engine/loop.py`` (where
``evaluate_logits`` lives), so editing the scoring code served the old
scores. Here every store's code part (``CODE_ENTRY``, found in the source, not
listed) is checked against every module its entry can import, and every
``dvc.yaml`` stage's code deps against its script's import closure.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cnnpipe.codegraph import code_identity as ci

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cnnpipe"


def code_entries() -> dict[str, str]:
    """Every ``CODE_ENTRY = "..."`` assignment in the package: module -> entry (one per store of results)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CODE_ENTRY" for t in node.targets)
                    and isinstance(node.value, ast.Constant)):
                found[path.relative_to(PACKAGE).as_posix()] = node.value.value
    return found


ENTRIES = code_entries()


def test_every_store_names_its_code_entry() -> None:
    # the run cache and run states (store/runs.py), evaluate's reports, the figures
    assert {"store/runs.py", "evaluation/score.py", "reports/figures.py"} <= set(ENTRIES)
    for entry in ENTRIES.values():
        assert ci.module_file(entry, PACKAGE) is not None, entry


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("src") / "cnnpipe"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


@pytest.mark.parametrize("entry", sorted(set(ENTRIES.values())))
def test_every_module_an_entry_can_import_changes_its_identity(entry: str, package_copy: Path) -> None:
    files = ci.identity_files(entry, root=package_copy)
    before = ci.code_identity(entry, root=package_copy)
    assert package_copy / "models" / "presets.yaml" in files or entry == "cnnpipe.reports.figures"
    for path in files:
        original = path.read_bytes()
        try:
            path.write_bytes(original + b"\n# edited\n")
            assert ci.code_identity(entry, root=package_copy) != before, f"editing {path.name} kept {entry}'s identity"
        finally:
            path.write_bytes(original)
    assert ci.code_identity(entry, root=package_copy) == before


@pytest.mark.slow
@pytest.mark.parametrize("entry", sorted(set(ENTRIES.values())))
def test_the_closure_holds_every_module_the_entry_imports_at_run_time(entry: str) -> None:
    """What Python really loads on import is a subset of the static closure (which adds lazy imports)."""
    code = f"import sys, {entry}; print('\\n'.join(m for m in sys.modules if m.split('.')[0] == 'cnnpipe'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = set(out.stdout.split())
    assert entry in loaded and loaded <= set(ci.closure([entry]))


def test_the_evaluate_cache_covers_evaluate_logits() -> None:
    """The reported bug: the scoring code in engine/loop.py must be part of evaluate's identity."""
    files = ci.identity_files(ENTRIES["evaluation/score.py"])
    assert PACKAGE / "engine" / "loop.py" in files and PACKAGE / "engine" / "augment.py" in files


def test_a_new_module_imported_inside_a_function_joins_the_identity(package_copy: Path, tmp_path: Path) -> None:
    root = tmp_path / "cnnpipe"
    shutil.copytree(package_copy, root)
    entry = ENTRIES["evaluation/score.py"]
    (root / "engine" / "tweak.py").write_text("SCALE = 1.0\n")
    loop = root / "engine" / "loop.py"
    loop.write_text(loop.read_text() + "\n\ndef _scale():\n    from cnnpipe.engine.tweak import SCALE\n    return SCALE\n")
    before = ci.code_identity(entry, root=root)
    assert root / "engine" / "tweak.py" in ci.identity_files(entry, root=root)
    (root / "engine" / "tweak.py").write_text("SCALE = -1.0\n")
    assert ci.code_identity(entry, root=root) != before


def test_modules_outside_the_closure_and_type_checking_imports_do_not_count(package_copy: Path, tmp_path: Path) -> None:
    root = tmp_path / "cnnpipe"
    shutil.copytree(package_copy, root)
    entry = ENTRIES["reports/figures.py"]
    before = ci.code_identity(entry, root=root)
    commands = root / "cli" / "commands.py"  # the CLI draws no figure
    assert commands not in ci.identity_files(entry, root=root)
    commands.write_text(commands.read_text() + "\n# edited\n")
    figures = root / "reports" / "figures.py"
    figures.write_text(figures.read_text() + "\nif TYPE_CHECKING:\n    from cnnpipe.cli import commands\n")
    assert commands not in ci.identity_files(entry, root=root)


def test_each_store_key_uses_its_entry_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The keys call code_identity(CODE_ENTRY): a changed identity gives another key, for every store."""
    from cnnpipe.reports import figures
    from cnnpipe.store import run_cache as runs

    seen: list[str] = []
    real = ci.code_identity

    def spy(*entries: str, root: Path | None = None) -> str:
        seen.extend(entries)
        return real(*entries, root=root) + "-spied"

    monkeypatch.setattr(ci, "code_identity", spy)
    runs.code_version.cache_clear()
    figures._code_version.cache_clear()
    monkeypatch.setattr(runs, "code_identity", spy)
    try:
        from importlib.metadata import version

        assert runs.code_version().endswith("-spied/torch-" + version("torch"))
        assert "-spied/" in figures._code_version()
    finally:
        runs.code_version.cache_clear()
        figures._code_version.cache_clear()
    assert {runs.CODE_ENTRY, figures.CODE_ENTRY} <= set(seen)


# --------------------------------------------------------------------------- dvc.yaml


def stage_scripts() -> dict[str, tuple[Path, list[str]]]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        script = stage["cmd"].split()[1]  # "python stages/<name>.py"
        assert script.startswith("stages/"), stage["cmd"]
        out[name] = (ROOT / script, [d for d in stage["deps"] if isinstance(d, str)])
    return out


@pytest.mark.parametrize("stage", sorted(stage_scripts()))
def test_each_stage_declares_exactly_its_code_closure(stage: str) -> None:
    script, deps = stage_scripts()[stage]
    declared = {d for d in deps if d.startswith(("src/", "stages/"))}
    wanted = {script.relative_to(ROOT).as_posix(),
              *(p.relative_to(ROOT).as_posix() for p in ci.stage_code_files(script, PACKAGE))}
    fix = f"run: python -m cnnpipe.codegraph.code_identity {script.relative_to(ROOT).as_posix()}"
    assert declared >= wanted, f"dvc.yaml stage {stage} misses {sorted(wanted - declared)}; {fix}"
    assert declared <= wanted, f"dvc.yaml stage {stage} lists {sorted(declared - wanted)}, which it never imports; {fix}"
