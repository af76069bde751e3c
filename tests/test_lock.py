"""requirements.lock must agree with pyproject.toml.

``scripts/setup.sh`` installs the exact versions in ``requirements.lock``
(hash-checked), then the project with ``--no-deps``: a dependency added to
``pyproject.toml`` but not to the lock would be missing, and a spec tightened
without re-locking would be silently ignored. Re-lock with
``bash scripts/lock.sh`` and commit both files.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
LOCKED_EXTRAS = ("test", "ray")  # what scripts/lock.sh resolves
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
DIRECT = "cnnpipe (pyproject.toml)"


def declared(pyproject: str) -> list[Requirement]:
    """The dependencies and the locked extras' requirements of a pyproject.toml text."""
    project = tomllib.loads(pyproject)["project"]
    specs = list(project.get("dependencies", []))
    for extra in LOCKED_EXTRAS:
        specs += project.get("optional-dependencies", {}).get(extra, [])
    return [Requirement(spec) for spec in specs]


def locked(lock: str) -> tuple[dict[str, list[Version]], set[str]]:
    """``{name: [pinned versions]}`` (one per marker branch) and the names locked because pyproject asks for them."""
    pins: dict[str, list[Version]] = {}
    direct: set[str] = set()
    name = None
    for line in lock.splitlines():
        match = PIN.match(line)
        if match:
            name = canonicalize_name(match.group(1))
            pins.setdefault(name, []).append(Version(match.group(2)))
        elif name and line.lstrip().startswith("#") and DIRECT in line:
            direct.add(name)
    return pins, direct


def disagreements(pyproject: str, lock: str) -> list[str]:
    """Every way the lock fails pyproject.toml, one line each (empty: they agree)."""
    pins, direct = locked(lock)
    problems = []
    wanted = set()
    for req in declared(pyproject):
        name = canonicalize_name(req.name)
        wanted.add(name)
        if name not in pins:
            problems.append(f"{req} is not in requirements.lock")
        for version in pins.get(name, []):
            if not req.specifier.contains(version, prereleases=True):
                problems.append(f"requirements.lock pins {name}=={version}, outside {req}")
    problems += [f"requirements.lock still pins {name} for cnnpipe, which no longer declares it"
                 for name in sorted(direct - wanted)]
    return problems


def test_the_lock_pins_every_declared_dependency_within_its_spec():
    problems = disagreements((ROOT / "pyproject.toml").read_text(), (ROOT / "requirements.lock").read_text())
    assert not problems, "; ".join(problems) + "; run: bash scripts/lock.sh"


def test_every_locked_package_has_a_hash():
    """setup.sh installs with --require-hashes: one pin without a hash fails the whole install."""
    text = (ROOT / "requirements.lock").read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text.split("\n", 2)[2])
    assert len(entries) > 50
    for entry in entries:
        assert PIN.match(entry) and "--hash=sha256:" in entry, entry.splitlines()[0]


PYPROJECT = """
[project]
name = "x"
dependencies = ["torch==2.14.1", "pandas>=2.0"]
[project.optional-dependencies]
test = ["pytest>=8"]
"""


def pinned(*lines: str) -> str:
    return "# header\n" + "\n".join(lines) + "\n"


def test_the_check_catches_a_missing_a_stale_and_an_unwanted_pin():
    good = pinned("torch==2.14.1 \\", "    # via cnnpipe (pyproject.toml)", "pandas==2.3.0 \\",
                  "    # via", "    #   cnnpipe (pyproject.toml)", "    #   mlflow", "pytest==8.4.0")
    assert disagreements(PYPROJECT, good) == []
    assert disagreements(PYPROJECT, good.replace("pytest==8.4.0", "pluggy==1.0")) == [
        "pytest>=8 is not in requirements.lock"]
    assert disagreements(PYPROJECT.replace("torch==2.14.1", "torch==2.15.0"), good) == [
        "requirements.lock pins torch==2.14.1, outside torch==2.15.0"]
    assert disagreements(PYPROJECT.replace(', "pandas>=2.0"', ""), good) == [
        "requirements.lock still pins pandas for cnnpipe, which no longer declares it"]
    # a marker branch per Python version: every branch must fit the spec
    split = good.replace("pandas==2.3.0 \\", "pandas==1.5.3 ; python_full_version < '3.12' \\\n"
                         "    # via cnnpipe (pyproject.toml)\npandas==2.3.0 ; python_full_version >= '3.12' \\")
    assert disagreements(PYPROJECT, split) == ["requirements.lock pins pandas==1.5.3, outside pandas>=2.0"]
