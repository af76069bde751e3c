"""Imports run one way: down the layer order written in the README's architecture section, and never in a circle.

The order is read from the README (the map a newcomer reads is the rule the
code keeps); every import in every module counts, the ones inside functions
included: an import may be deferred to keep torch or mlflow off a fast path,
never to hide a cycle. A package's ``__init__`` runs before any of its
modules, so "imports ``cnnpipe.a.b``" also means "runs ``cnnpipe.a``": that
edge counts too, which is why no ``__init__`` re-exports its modules.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from cnnpipe.codegraph import code_identity as ci

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "cnnpipe"


def readme_layers() -> list[str]:
    """The packages of ``src/cnnpipe/`` in the README's architecture block, top layer first."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("## Architecture", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    inside = block.split("src/cnnpipe/", 1)[1]
    layers = []
    for line in inside.splitlines()[1:]:
        match = re.match(r"^  (\w+)/\s", line)
        if match:
            layers.append(match.group(1))
        elif line and not line.startswith("   "):
            break  # the block has left src/cnnpipe/
    return layers


def module_graph() -> dict[str, set[str]]:
    """Every cnnpipe module -> the cnnpipe modules it runs when imported or called (its parent package included)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        wanted = ci.imported_names(ast.parse(path.read_bytes()), name, path.name == "__init__.py")
        parent = name.rpartition(".")[0]
        wanted |= {parent} if parent else set()
        graph[name] = {found for candidate in wanted for found in ci._with_parents(candidate)
                       if found in modules and found != name}
    return graph


def package_of(module: str) -> str:
    """The layer a module belongs to ('' for the package root and ``__main__``, which sit above every layer)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else ""


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        found.append(sorted(group))
    return found


LAYERS = readme_layers()
GRAPH = module_graph()


def test_the_readme_names_every_package_once_as_a_layer() -> None:
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert sorted(LAYERS) == packages, "README architecture: list every package of src/cnnpipe/ once, top layer first"


def test_no_module_imports_a_layer_above_its_own() -> None:
    rank = {name: len(LAYERS) - i for i, name in enumerate(LAYERS)}  # the bottom layer ranks 1
    upward = sorted(f"{module} -> {target}" for module, targets in GRAPH.items() for target in targets
                    if package_of(module) and package_of(target)
                    and rank[package_of(target)] > rank[package_of(module)])
    assert not upward, "imports up the layer order (README architecture):\n" + "\n".join(upward)


def test_no_import_cycle() -> None:
    assert not cycles(GRAPH), "import cycles:\n" + "\n".join(" <-> ".join(group) for group in cycles(GRAPH))


def test_the_cycle_finder_finds_a_cycle_and_passes_a_chain() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


@pytest.mark.parametrize("init", sorted(PACKAGE.glob("*/__init__.py")), ids=lambda p: p.parent.name)
def test_no_package_init_imports_cnnpipe(init: Path) -> None:
    """An ``__init__`` that re-exports its modules makes every importer of one module run them all."""
    name = f"cnnpipe.{init.parent.name}"
    assert not ci.imported_names(ast.parse(init.read_bytes()), name, True)


def module_level_imports(module: str) -> tuple[set[str], set[str]]:
    """(third-party top-level names, cnnpipe modules) that importing ``module`` runs at once (not inside functions)."""
    path = ci.module_file(module, PACKAGE)
    assert path is not None, module
    third: set[str] = set()
    own: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If):
                if not ci._is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    (own if alias.name.startswith("cnnpipe") else third).add(alias.name)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                base = node.module or ""
                if base.startswith("cnnpipe"):
                    own.update({base, *(f"{base}.{alias.name}" for alias in node.names)})
                else:
                    third.add(base)

    visit(ast.parse(path.read_bytes()).body)
    runs = {found for name in own for found in ci._with_parents(name) if ci.module_file(found, PACKAGE)}
    return {name.split(".")[0] for name in third} - set(sys.stdlib_module_names) - {"__future__"}, runs - {module}


def brings_a_library(module: str, seen: set[str] | None = None) -> bool:
    """Whether importing ``module`` imports a third-party library (directly or through cnnpipe modules)."""
    seen = set() if seen is None else seen
    if module in seen:
        return False
    seen.add(module)
    third, own = module_level_imports(module)
    return bool(third) or any(brings_a_library(name, seen) for name in own)


def test_an_import_inside_a_function_only_defers_a_library() -> None:
    """Deferring an import keeps torch, mlflow, pandas ... off a fast path; a module that brings no third-party
    library costs nothing to import at the top, so deferring it only hides the dependency (once: a cycle)."""
    needless = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        for function in ast.walk(ast.parse(path.read_bytes())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("cnnpipe"):
                    targets = {f"{node.module}.{a.name}" if ci.module_file(f"{node.module}.{a.name}", PACKAGE)
                               else node.module for a in node.names}
                    needless += [f"{module}:{node.lineno} defers {t}" for t in sorted(targets) if not brings_a_library(t)]
    assert not needless, "move these imports to the top of their module:\n" + "\n".join(sorted(set(needless)))
