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
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def defining_file(function: str) -> Path:
    """The package file that defines ``function`` (the scoring code has moved between engine modules before)."""
    return next(p for p in sorted(PACKAGE.rglob("*.py")) if f"\ndef {function}(" in p.read_text())


def test_every_store_names_its_code_entry() -> None:
    # the run cache and run states (store/run_cache.py), evaluate's reports, the figures
    assert {"store/run_cache.py", "evaluation/score.py", "figures/figure_cache.py"} <= set(ENTRIES)
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
    assert package_copy / "models" / "presets.yaml" in files or entry == "cnnpipe.figures.figure_cache"
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
    """The reported bug: the scoring code (``evaluate_logits``, once in engine/loop.py) must be part of evaluate's identity."""
    files = ci.identity_files(ENTRIES["evaluation/score.py"])
    assert defining_file("evaluate_logits") in files and PACKAGE / "engine" / "augment.py" in files


def test_a_new_module_imported_inside_a_function_joins_the_identity(package_copy: Path, tmp_path: Path) -> None:
    root = tmp_path / "cnnpipe"
    shutil.copytree(package_copy, root)
    entry = ENTRIES["evaluation/score.py"]
    (root / "engine" / "tweak.py").write_text("SCALE = 1.0\n")
    scorer = root / defining_file("evaluate_logits").relative_to(PACKAGE)
    scorer.write_text(scorer.read_text() + "\n\ndef _scale():\n    from cnnpipe.engine.tweak import SCALE\n    return SCALE\n")
    before = ci.code_identity(entry, root=root)
    assert root / "engine" / "tweak.py" in ci.identity_files(entry, root=root)
    (root / "engine" / "tweak.py").write_text("SCALE = -1.0\n")
    assert ci.code_identity(entry, root=root) != before


def test_modules_outside_the_closure_and_type_checking_imports_do_not_count(package_copy: Path, tmp_path: Path) -> None:
    root = tmp_path / "cnnpipe"
    shutil.copytree(package_copy, root)
    entry = ENTRIES["figures/figure_cache.py"]
    before = ci.code_identity(entry, root=root)
    commands = root / "cli" / "commands.py"  # the CLI draws no figure
    assert commands not in ci.identity_files(entry, root=root)
    commands.write_text(commands.read_text() + "\n# edited\n")
    assert ci.code_identity(entry, root=root) == before  # an edit outside the closure keeps the stored figures
    figures = root / "figures" / "figure_cache.py"
    figures.write_text(figures.read_text() + "\nif TYPE_CHECKING:\n    from cnnpipe.cli import commands\n")
    assert commands not in ci.identity_files(entry, root=root)


def test_each_store_key_uses_its_entry_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every store names its keys through the one API (``store.outputs``) with code_identity(CODE_ENTRY):
    a changed identity gives another key, for every store."""
    from importlib.metadata import version

    from cnnpipe.evaluation import score
    from cnnpipe.figures import figure_cache
    from cnnpipe.store import outputs
    from cnnpipe.store import run_cache as runs

    stores = {runs.CODE_ENTRY: runs.run_store(), score.CODE_ENTRY: score.report_store(),
              figure_cache.CODE_ENTRY: figure_cache.figure_store()}
    outputs.code_version.cache_clear()
    before = {entry: store.key({"inputs": 1}) for entry, store in stores.items()}
    seen: list[str] = []
    real = ci.code_identity

    def spy(*entries: str, root: Path | None = None) -> str:
        seen.extend(entries)
        return real(*entries, root=root) + "-spied"

    monkeypatch.setattr(ci, "code_identity", spy)
    outputs.code_version.cache_clear()
    try:
        after = {entry: store.key({"inputs": 1}) for entry, store in stores.items()}
        assert runs.code_version().endswith("-spied/torch-" + version("torch"))
        assert score.report_store().code().endswith("-spied/torch-" + version("torch"))
        assert "-spied/matplotlib-" in figure_cache.figure_store().code("cnnpipe.figures.curve_figures")
    finally:
        outputs.code_version.cache_clear()
    assert all(after[entry] != before[entry] for entry in stores)
    assert set(stores) <= set(seen) and "cnnpipe.figures.curve_figures" in seen


def test_the_imports_kept_on_disk_give_the_same_closure_and_an_edit_is_read_again(package_copy: Path, tmp_path: Path) -> None:
    root = tmp_path / "cnnpipe"
    shutil.copytree(package_copy, root)
    entry = ENTRIES["evaluation/score.py"]
    parsed = ci.closure([entry], root)
    kept = root / "__pycache__" / "cnnpipe-imports.json"
    assert kept.is_file()  # beside Python's bytecode: ignored by git and DVC
    ci._KEPT.root = None  # as a fresh process: read back from the file
    assert ci.closure([entry], root) == parsed
    (root / "evaluation" / "extra.py").write_text("X = 1\n")
    score = root / "evaluation" / "score.py"
    score.write_text(score.read_text() + "\nfrom cnnpipe.evaluation import extra  # noqa\n")
    ci._KEPT.root = None
    assert "cnnpipe.evaluation.extra" in ci.closure([entry], root)
