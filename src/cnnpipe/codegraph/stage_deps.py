"""Each DVC stage's code deps: the package folders its script's import closure reaches, derived, and checked at its start.

DVC decides whether a stage is stale from the files it declares, so a
module the stage runs but does not declare can change without ``dvc repro``
noticing. Two things close that gap:

* **Folders, not files.** A stage declares ``src/cnnpipe/__init__.py`` and
  the folder of every package its closure touches
  (``codegraph.code_identity.closure``: imports inside functions count). A
  module added later to one of those packages is covered the moment it
  exists; the layer order (README, "Architecture") keeps each stage to the
  packages it runs, so the folders stay few. ``--write`` rewrites them in
  ``dvc.yaml``; ``tests/test_stage_deps.py`` fails when they drift.
* **A check at every stage's start.** ``check_code_deps`` compares the
  closure with what ``dvc.yaml`` declares for the running stage and, when a
  module lies outside every declared path (a stage started importing a
  package it did not use before), refuses with one line naming the module
  and the command that fixes the pipeline file, before the stage writes
  anything. It reads only the source (``ast``) and ``dvc.yaml``.

The package's own stores key on a finer identity (the closure's modules,
``code_identity``); these folder deps decide only when DVC starts a stage.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from cnnpipe.codegraph.code_identity import package_root, stage_code_files
from cnnpipe.util.errors import CnnpipeError

WRITE_COMMAND = "python -m cnnpipe.codegraph.stage_deps --write"
_SCRIPT = re.compile(r"^python (stages/\S+\.py)\b")
_WIDTH = 112  # wrap the flow list of a stage's deps at this column
_PLAIN = re.compile(r"[\w./-]+")


def code_deps(script: Path, project: Path, root: Path | None = None) -> list[str]:
    """The code deps ``script`` needs, relative to ``project``: the package root's ``__init__.py`` and package folders."""
    root = root or package_root()
    found: set[str] = set()
    for path in stage_code_files(script, root):
        relative = path.relative_to(root)
        top = root / relative.parts[0] if len(relative.parts) > 1 else path
        found.add(top.relative_to(project).as_posix())
    return sorted(found)


def _load(dvc_yaml: Path) -> dict[str, Any]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(dvc_yaml.read_text(encoding="utf-8"), Loader=loader) or {}


def stage_scripts(dvc_yaml: Path, loaded: dict[str, Any] | None = None) -> dict[str, str]:
    """Stage name -> the script its ``cmd`` runs (``stages/train.py``), for stages that run a script."""
    out = {}
    for name, stage in ((loaded if loaded is not None else _load(dvc_yaml)).get("stages") or {}).items():
        match = _SCRIPT.match(str(stage.get("cmd", "")))
        if match:
            out[name] = match.group(1)
    return out


def declared_deps(dvc_yaml: Path, loaded: dict[str, Any] | None = None) -> dict[str, list[str]]:
    """Stage name -> its ``deps`` as written (interpolated entries like ``${data.source}`` kept as text)."""
    stages = (loaded if loaded is not None else _load(dvc_yaml)).get("stages") or {}
    return {name: [str(dep) for dep in stage.get("deps") or []] for name, stage in stages.items()}


def uncovered(files: list[str], deps: list[str]) -> list[str]:
    """The files (project-relative) that no dep covers: a dep covers itself and, as a folder, everything below it."""
    return [f for f in files if not any(f == dep or f.startswith(dep.rstrip("/") + "/") for dep in deps)]


def check_code_deps(script: str | Path, project: Path | None = None) -> None:
    """Refuse (one ``CnnpipeError`` line) to run a stage whose ``dvc.yaml`` deps miss a module it runs.

    Quiet outside a DVC project, for a script no stage runs, or when the
    running package is not the project's own ``src/`` (nothing to compare).
    """
    project = (project or Path.cwd()).resolve()
    dvc_yaml = project / "dvc.yaml"
    root = package_root()
    script = Path(script).resolve()
    if not dvc_yaml.is_file() or not root.is_relative_to(project) or not script.is_relative_to(project):
        return
    relative = script.relative_to(project).as_posix()
    loaded = _load(dvc_yaml)
    stages = [name for name, path in stage_scripts(dvc_yaml, loaded).items() if path == relative]
    if not stages:
        return
    files = [relative, *(p.relative_to(project).as_posix() for p in stage_code_files(script, root))]
    deps = declared_deps(dvc_yaml, loaded)
    for stage in stages:
        missing = uncovered(files, deps.get(stage, []))
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CnnpipeError(f"dvc.yaml: stage {stage} runs {missing[0]}{more} but does not depend on it, so DVC "
                               f"would keep results computed without it; run `{WRITE_COMMAND}` and commit dvc.yaml")


def _flow_list(items: list[str], indent: str) -> list[str]:
    """``deps: [a, b, ...]`` wrapped at ``_WIDTH`` columns, continuation lines indented under the first item."""
    lines: list[str] = []
    current = f"{indent}deps: ["
    pad = " " * len(current)
    for i, item in enumerate(items):
        shown = item if _PLAIN.fullmatch(item) else json.dumps(item)  # ${...} must be quoted in a flow list
        piece = shown + ("]" if i == len(items) - 1 else ",")
        if len(current) + len(piece) + 1 > _WIDTH and not current.endswith("["):
            lines.append(current.rstrip())
            current = pad
        current += ("" if current.endswith("[") or current == pad else " ") + piece
    lines.append(current)
    return lines


def write_stage_deps(dvc_yaml: Path, root: Path | None = None) -> list[str]:
    """Rewrite each script stage's ``deps`` in ``dvc_yaml``: its other deps as they are, then its derived code deps.

    The deps become one flow list (``deps: [stages/x.py, data/..., src/cnnpipe/...]``);
    every other line stays. Returns the names of the stages whose deps changed.
    """
    project = dvc_yaml.parent.resolve()
    root = root or package_root()
    scripts = stage_scripts(dvc_yaml)
    declared = declared_deps(dvc_yaml)
    package = root.relative_to(project).as_posix()
    lines = dvc_yaml.read_text(encoding="utf-8").splitlines()
    out: list[str] = []
    changed: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        head = re.match(r"^  ([\w-]+):\s*$", line)
        if head:
            stage = head.group(1)
        deps = re.match(r"^(\s+)deps:", line)
        if not deps or stage not in scripts:
            out.append(line)
            i += 1
            continue
        indent = deps.group(1)
        i += 1  # skip the old value: a flow list's continuation lines or a block list's items
        while i < len(lines) and lines[i].strip() and lines[i].startswith(indent + " "):
            i += 1
        script = scripts[stage]
        others = [d for d in declared[stage] if d != script and not (d == package or d.startswith(package + "/"))]
        wanted = [script, *others, *code_deps(project / script, project, root)]
        if wanted != declared[stage]:
            changed.append(stage)
        out.extend(_flow_list(wanted, indent))
    text = "\n".join(out) + "\n"
    if text != dvc_yaml.read_text(encoding="utf-8"):
        dvc_yaml.write_text(text, encoding="utf-8")
    return changed


def main(argv: list[str]) -> int:
    """Print each stage's derived code deps; ``--write`` rewrites them in ``dvc.yaml``; ``--check`` exits 1 on drift."""
    project = package_root().parents[1]
    dvc_yaml = project / "dvc.yaml"
    if argv == ["--write"]:
        changed = write_stage_deps(dvc_yaml)
        print(f"dvc.yaml: code deps rewritten ({', '.join(changed)})" if changed else "dvc.yaml: code deps up to date")
        return 0
    declared = declared_deps(dvc_yaml)
    drift = 0
    for stage, script in stage_scripts(dvc_yaml).items():
        wanted = code_deps(project / script, project)
        have = [d for d in declared.get(stage, []) if d.startswith(package_root().relative_to(project).as_posix())]
        status = "ok" if wanted == have else "DRIFT"
        drift += status != "ok"
        print(f"{stage:10s} {status:5s} {' '.join(wanted)}")
    if argv == ["--check"] and drift:
        print(f"run `{WRITE_COMMAND}` and commit dvc.yaml", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
