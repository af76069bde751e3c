"""Start-up time of the commands a user types, against the interpreter and the heavy imports.

Runs each command ``--repeats`` times in a fresh process from the repo root
and prints the median wall time and its ratio to a bare ``python -c pass``,
as a table; writes ``benchmarks/out/bench_startup.json``. The reference rows
(``import torch``, ``import mlflow``) show what a command avoids by
importing lazily. Usage: ``python benchmarks/bench_startup.py [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from summary import record

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
COMMANDS: list[tuple[str, list[str]]] = [
    ("python -c pass (reference)", [PY, "-c", "pass"]),
    ("cnnpipe --help", [PY, "-m", "cnnpipe", "--help"]),
    ("cnnpipe validate", [PY, "-m", "cnnpipe", "validate"]),
    *[(f"python stages/{stage}.py --help", [PY, f"stages/{stage}.py", "--help"])
      for stage in ("download", "prepare", "train", "evaluate", "plots")],
    ("python -c 'import torch' (reference)", [PY, "-c", "import torch"]),
    ("python -c 'import mlflow' (reference)", [PY, "-c", "import mlflow"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "bench_startup.json")
    args = parser.parse_args()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    load_before = os.getloadavg()
    medians: dict[str, float] = {}
    for label, command in COMMANDS:
        subprocess.run(command, cwd=ROOT, env=env, capture_output=True, check=True)  # warm the OS file cache
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            subprocess.run(command, cwd=ROOT, env=env, capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        medians[label] = statistics.median(times)
    base = medians[COMMANDS[0][0]]
    print(f"{'command':<44} {'median s':>9} {'x python':>9}")
    for label, seconds in medians.items():
        print(f"{label:<44} {seconds:>9.3f} {seconds / base:>8.1f}x")
        record("startup", label, seconds, "s (median)", seconds / base, "python -c pass")
    load_after = os.getloadavg()
    print(f"(medians of {args.repeats}; {os.cpu_count()} cores; load before {[round(x, 2) for x in load_before]}, "
          f"after {[round(x, 2) for x in load_after]})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeats": args.repeats, "medians_s": medians, "loadavg_before": load_before,
                                    "loadavg_after": load_after}, indent=2) + "\n")


if __name__ == "__main__":
    main()
