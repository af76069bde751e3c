"""Run every benchmark in this folder and print their headline figures as one table (``make bench``).

    python benchmarks/run_all.py [--quick] [NAME ...]

Each ``bench_*.py`` runs in its own process, one after another (never side
by side: they measure speed), with its own output streamed as it goes; the
figures each one records (``summary.record``) are gathered into one table at
the end. ``--quick`` gives every script its small mode (fewer repeats, one
or two epochs: minutes instead of tens of minutes; figures are noisier).
``NAME`` picks scripts by name (``engine``, ``grid``, ``startup``,
``time_to_accuracy``). Every script but ``bench_startup.py`` needs the real
prepared Fashion-MNIST (``make run`` first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PREPARED = ROOT / "data" / "prepared"
NEEDS_NO_DATA = {"startup"}
# Each script's own small mode (see its --help).
QUICK: dict[str, list[str]] = {
    "startup": ["--repeats", "3"],
    "engine": ["--repeats", "1", "--eval-repeats", "2"],
    "grid": ["--repeats", "1", "--epochs", "1"],
    "time_to_accuracy": ["--epochs", "2"],
    "memory": ["--big", "8000", "--phases", "generate,prepare,train,throughput", "--repeats", "1"],
    "transfer": ["--archs", "shufflenet_v2_x0_5", "--shots", "5", "--seeds", "1", "--epochs", "5"],
    "features": ["--train", "1000", "--val", "200", "--epochs", "2", "--pretrain-epochs", "1"],
    "exp_overhead": ["--repeats", "2"],
}


def scripts() -> dict[str, Path]:
    """``{name: path}`` of every ``bench_<name>.py`` here, sorted by name."""
    return {path.stem.removeprefix("bench_"): path for path in sorted(HERE.glob("bench_*.py"))}


def table(rows: list[dict], failures: list[tuple[str, int, float]]) -> str:
    """The combined table: one row per recorded figure, then any script that recorded nothing."""
    header = ("benchmark", "measurement", "value", "unit", "ratio")
    lines = [[r["benchmark"], r["measurement"], _number(r["value"]), r["unit"],
              f"{r['ratio']:.2f}x vs {r['versus']}" if r.get("ratio") and r.get("versus") else ""] for r in rows]
    lines += [[name, f"no figures (exit {code}, {seconds:.0f} s): see its output above", "", "", ""]
              for name, code, seconds in failures]
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    out = ["  ".join(str(cell).ljust(width) for cell, width in zip(header, widths)),
           "  ".join("-" * width for width in widths)]
    out += ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in lines]
    return "\n".join(out)


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every script's small mode (minutes, noisier)")
    parser.add_argument("names", nargs="*", help=f"only these ({', '.join(scripts())}); default: all")
    args = parser.parse_args(argv)
    found = scripts()
    unknown = [name for name in args.names if name not in found]
    if unknown:
        parser.error(f"no benchmark named {unknown[0]!r}; known: {', '.join(found)}")
    chosen = {name: path for name, path in found.items() if not args.names or name in args.names}
    if set(chosen) - NEEDS_NO_DATA and not (PREPARED / "stats.json").is_file():
        print(f"error: {PREPARED.relative_to(ROOT)}/ is missing; run `make run` (or `dvc repro prepare`) first",
              file=sys.stderr)
        return 2

    rows: list[dict] = []
    failures: list[tuple[str, int, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, path in chosen.items():
            summary = Path(tmp) / f"{name}.jsonl"
            command = [sys.executable, str(path), *(QUICK.get(name, []) if args.quick else [])]
            print(f"\n=== {name}: {' '.join([Path(command[1]).name, *command[2:]])}", flush=True)
            start = time.perf_counter()
            code = subprocess.run(command, cwd=ROOT, env={**os.environ, "CNNPIPE_BENCH_SUMMARY": str(summary)}).returncode
            seconds = time.perf_counter() - start
            recorded = [json.loads(line) for line in summary.read_text().splitlines()] if summary.is_file() else []
            rows += recorded
            if not recorded:
                failures.append((name, code, seconds))
    print(f"\n=== summary ({'quick' if args.quick else 'full'} mode; {os.cpu_count()} cores, "
          f"load average now {os.getloadavg()[0]:.2f})\n")
    print(table(rows, failures))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
