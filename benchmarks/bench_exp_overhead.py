"""What a fully cached ``dvc exp run -S lr=...`` costs, in epochs of the tutorial loop (issue 17's yardstick).

    python benchmarks/bench_exp_overhead.py [--repeats 4] [--workdir benchmarks/out/exp_overhead]

Builds a throw-away copy of this project (git + DVC, real Fashion-MNIST from
Debian's ``dataset-fashion-mnist``, the shipped ``params.yaml`` with
``epochs: 1`` so set-up is short), runs the pipeline once, then runs both
values of the ``lr`` axis once each so every stage has stored what it
computes (run cache, evaluate's reports, the figures). The measured runs then
alternate ``dvc exp run -S lr=0.01`` and ``-S lr=0.001``: every stage
executes (their params changed), nothing is trained, scored or drawn again.

Also timed, in the same sitting: one epoch of the tutorial loop
(``bench_engine.tutorial_epoch``, the project's yardstick) and the code
identity of every store (``codegraph.code_identity``: what the derived cache keys
add to each stage). Prints the medians and their ratio to a tutorial epoch.
Not a test: no assertions.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import torchvision_root, tutorial_epoch  # noqa: E402
from summary import record  # noqa: E402

BIN = Path(sys.executable).parent
COPY = ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore")
TREES = ("stages", "src", "dvc_plots")
TUTORIAL_IMAGES = 60_000  # the tutorial loop trains on all of Fashion-MNIST's training images


def sh(args: list[str], cwd: Path) -> float:
    """Run ``args`` in ``cwd`` (this venv first on PATH); its wall time in seconds; fail loudly."""
    import os

    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "true", "DVC_NO_ANALYTICS": "1", "PYTHONPATH": str(cwd / "src")}
    start = time.perf_counter()
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return took


def build(project: Path) -> None:
    if project.exists():
        shutil.rmtree(project)
    project.mkdir(parents=True)
    for name in COPY:
        shutil.copy(ROOT / name, project / name)
    for name in TREES:
        shutil.copytree(ROOT / name, project / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["epochs"] = 1
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    sh(["git", "init", "-q"], project)
    sh([str(BIN / "dvc"), "init", "-q"], project)
    shutil.copy(ROOT / ".dvc" / "config", project / ".dvc" / "config")
    shutil.copytree(ROOT / ".dvc" / "plots", project / ".dvc" / "plots")
    sh([*git, "add", "-A"], project)
    sh([*git, "commit", "-qm", "bench"], project)


def store_entries() -> list[str]:
    """Every store's ``CODE_ENTRY`` (found in the source, as tests/test_code_identity.py finds them)."""
    import ast

    found = []
    for path in sorted((ROOT / "src" / "cnnpipe").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CODE_ENTRY" for t in node.targets)
                    and isinstance(node.value, ast.Constant)):
                found.append(node.value.value)
    return sorted(set(found))


def fresh_process_seconds(code: str) -> float:
    """Wall time ``code`` measures (it prints it) in a fresh interpreter on this checkout's src/."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT / "src"), "PATH": str(BIN)})
    return float(out.stdout.strip())


def identity_seconds() -> float:
    """Computing every store's code identity in a fresh process (what the stages add, together)."""
    return fresh_process_seconds(
        "import time; t = time.perf_counter(); from cnnpipe.codegraph.code_identity import code_identity; "
        f"[code_identity(e) for e in {store_entries()!r}]; print(time.perf_counter() - t)")


def check_seconds() -> float:
    """Every stage's start check of its dvc.yaml code deps (codegraph.stage_deps), in one fresh process."""
    return fresh_process_seconds(
        "import time; from pathlib import Path; t = time.perf_counter(); "
        "from cnnpipe.codegraph.stage_deps import check_code_deps, stage_scripts; "
        "[check_code_deps(Path(s)) for s in stage_scripts(Path('dvc.yaml')).values()]; "
        "print(time.perf_counter() - t)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=4, help="measured dvc exp runs (alternating lr values)")
    parser.add_argument("--workdir", default=str(ROOT / "benchmarks" / "out" / "exp_overhead"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the tutorial epoch")
    args = parser.parse_args()

    project = Path(args.workdir) / "project"
    print(f"building {project} and running the pipeline once (epochs: 1) ...", flush=True)
    build(project)
    first = sh([str(BIN / "dvc"), "repro"], project)
    values = ("0.01", "0.001")
    for value in values:  # every stage stores what it computes for both values
        sh([str(BIN / "dvc"), "exp", "run", "-S", f"lr={value}"], project)
    cached = [sh([str(BIN / "dvc"), "exp", "run", "-S", f"lr={values[i % 2]}"], project) for i in range(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        root = torchvision_root(Path(tmp))
        # tutorial_epoch returns images/s over the 60,000 training images: one epoch is 60,000 / that
        epochs = [TUTORIAL_IMAGES / tutorial_epoch(root, args.threads) for _ in range(2)]
    identity = [identity_seconds() for _ in range(3)]
    checks = [check_seconds() for _ in range(3)]

    te = statistics.median(epochs)
    exp = statistics.median(cached)
    ident = statistics.median(identity)
    check = statistics.median(checks)
    stores = len(store_entries())
    print(f"\nfirst dvc repro (downloads, prepares, trains 4 one-epoch runs): {first:.1f} s")
    print(f"{'what':<58} {'seconds':>8} {'tutorial epochs':>16}")
    print(f"{'tutorial loop, one epoch (te)':<58} {te:>8.2f} {1.0:>16.2f}")
    print(f"{'fully cached dvc exp run -S lr=..., median of ' + str(len(cached)):<58} {exp:>8.2f} {exp / te:>16.2f}")
    print(f"{'  each: ' + ', '.join(f'{c:.2f}' for c in cached):<58}")
    print(f"{f'code identity of the {stores} stores (fresh process, median of 3)':<58} {ident:>8.3f} {ident / te:>16.3f}")
    print(f"{'code-deps check of all 6 stages (fresh process, median of 3)':<58} {check:>8.3f} {check / te:>16.3f}")
    record("exp_overhead", "cached dvc exp run", exp, "s", exp / te, "tutorial epoch")
    record("exp_overhead", f"code identity ({stores} stores)", ident, "s", ident / te, "tutorial epoch")
    record("exp_overhead", "code-deps check (6 stages)", check, "s", check / te, "tutorial epoch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
