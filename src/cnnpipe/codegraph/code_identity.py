"""Which code computed a stored result, derived from the import graph (never a hand-kept list).

A stored result (a cached run, a run state, stored evaluate reports and
figures, cached backbone features) is only valid for the code that computed
it. Each store names its computation by an *entry module*
(``CODE_ENTRY`` in the store's module); ``code_identity`` hashes the source of
every cnnpipe module in that module's static import closure, plus the package
data files (``*.yaml``, ``*.json``) beside any module of the closure (the
presets file is read, not imported).

The closure is read from the source with ``ast``, so imports inside
functions (cnnpipe imports its heavy parts lazily) count as much as
module-level ones; ``from cnnpipe.x import y`` counts ``cnnpipe.x.y`` when that
is a module, and every parent package (its ``__init__`` runs first). Imports
under ``if TYPE_CHECKING:`` never run and do not count. A module added
tomorrow and imported anywhere below the entry is in the identity without
anyone remembering it; a module nobody imports from there cannot change the
result and stays out (editing it keeps the caches).

The same closure gives each DVC stage's code deps (``stage_code_files``, made
into package folders by ``codegraph.stage_deps``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

PACKAGE = "cnnpipe"
DATA_SUFFIXES = (".yaml", ".yml", ".json")


def package_root() -> Path:
    """The folder of the ``cnnpipe`` package whose code is running (``src/cnnpipe`` in a checkout)."""
    return Path(__file__).resolve().parents[1]


def module_file(name: str, root: Path) -> Path | None:
    """The source file of module ``name`` (``cnnpipe.a.b``) under ``root`` (the package folder), or None."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    base = root.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py") if parts[1:] else None, base / "__init__.py"):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


_STATEMENT_FIELDS = ("body", "orelse", "finalbody", "handlers")  # where a statement holds statements


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every ``cnnpipe`` module name an AST may import at run time (candidates: not all need to exist)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        for field in _STATEMENT_FIELDS:  # imports are statements: skip expressions, the bulk of a tree
            for child in getattr(node, field, ()):
                visit(child)
        for case in getattr(node, "cases", ()):  # match statements
            for child in case.body:
                visit(child)

    visit(tree)
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".")}


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


@lru_cache(maxsize=1024)
def _imports_at(path: Path, module: str, stamp: tuple[int, int]) -> frozenset[str]:
    del stamp  # part of the cache key only: an edited file is read again
    tree = ast.parse(path.read_bytes(), filename=str(path))
    return frozenset(imported_names(tree, module, path.name == "__init__.py"))


class _ImportsFile:
    """Each module's imports kept across processes in ``<package>/__pycache__/`` beside Python's bytecode.

    Every stage process computes closures (its start check, its stores'
    keys); parsing ~90 files is most of that cost. An entry is valid while
    the file's (mtime_ns, size) stamp is unchanged. The file sits where
    Python keeps bytecode: git and DVC ignore it, and an unwritable package
    (a read-only install) only means parsing every time.
    """

    def __init__(self) -> None:
        self.root: Path | None = None
        self.entries: dict[str, list[Any]] = {}
        self.dirty = False

    def path(self, root: Path) -> Path:
        return root / "__pycache__" / "cnnpipe-imports.json"

    def load(self, root: Path) -> None:
        if self.root == root:
            return
        self.root, self.dirty = root, False
        try:
            loaded = json.loads(self.path(root).read_text(encoding="utf-8"))
            self.entries = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self.entries = {}

    def get(self, key: str, stamp: list[int]) -> frozenset[str] | None:
        entry = self.entries.get(key)
        return frozenset(entry[1]) if isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp else None

    def put(self, key: str, stamp: list[int], names: frozenset[str]) -> None:
        self.entries[key] = [stamp, sorted(names)]
        self.dirty = True

    def save(self) -> None:
        if not self.dirty or self.root is None:
            return
        target = self.path(self.root)
        try:
            target.parent.mkdir(exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(self.entries, sort_keys=True), encoding="utf-8")
            os.replace(tmp, target)  # whole or not at all: a concurrent reader sees the old or the new file
            self.dirty = False
        except OSError:
            pass


_KEPT = _ImportsFile()


def _imports_of(path: Path, module: str, root: Path | None = None) -> frozenset[str]:
    """``imported_names`` of a module file, parsed once while the file is unchanged (in this process and on disk)."""
    stat = path.stat()
    stamp = [stat.st_mtime_ns, stat.st_size]
    if root is None:
        return _imports_at(path, module, (stat.st_mtime_ns, stat.st_size))
    _KEPT.load(root)
    key = f"{module}:{path.relative_to(root).as_posix()}"
    names = _KEPT.get(key, stamp)
    if names is None:
        names = _imports_at(path, module, (stat.st_mtime_ns, stat.st_size))
        _KEPT.put(key, stamp, names)
    return names


def closure(entries: Iterable[str], root: Path | None = None, *, scripts: Iterable[Path] = ()) -> dict[str, Path]:
    """Module name -> source file for every cnnpipe module the ``entries`` (and ``scripts``) may import."""
    root = root or package_root()
    todo: list[str] = []
    for script in scripts:
        todo.extend(imported_names(ast.parse(Path(script).read_bytes()), "__main__", False))
    todo.extend(entries)
    found: dict[str, Path] = {}
    while todo:
        for name in _with_parents(todo.pop()):
            if name in found:
                continue
            path = module_file(name, root)
            if path is None:
                continue
            found[name] = path
            todo.extend(_imports_of(path, name, root))
    _KEPT.save()
    return dict(sorted(found.items()))


def data_files(modules: dict[str, Path]) -> list[Path]:
    """Package data files (yaml/json) in the folder of any package in ``modules``: they are read, not imported."""
    folders = {path.parent for name, path in modules.items() if path.name == "__init__.py"}
    return sorted(p for folder in folders for p in folder.iterdir() if p.is_file() and p.suffix in DATA_SUFFIXES)


def identity_files(*entries: str, root: Path | None = None) -> list[Path]:
    """The files whose bytes make up ``code_identity(*entries)``: the closure's sources and its data files."""
    modules = closure(entries, root)
    return sorted({*modules.values(), *data_files(modules)})


def files_digest(files: Iterable[Path], root: Path) -> str:
    """SHA-256 over each file's path (relative to ``root``) and bytes, in path order (16 hex characters)."""
    sha = hashlib.sha256()
    for path in sorted(files):
        sha.update(path.relative_to(root).as_posix().encode() + b"\0")
        sha.update(path.read_bytes())
        sha.update(b"\0")
    return sha.hexdigest()[:16]


def code_identity(*entries: str, root: Path | None = None) -> str:
    """A digest naming the code that ``entries`` run: every module of their import closure, and its data files."""
    root = root or package_root()
    return files_digest(identity_files(*entries, root=root), root)


def stage_code_files(script: Path, root: Path | None = None) -> list[Path]:
    """The cnnpipe files a stage script runs (its import closure and their data files), for ``dvc.yaml`` deps."""
    modules = closure((), root, scripts=[script])
    return sorted({*modules.values(), *data_files(modules)})
