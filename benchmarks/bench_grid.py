"""Grid throughput: sequential vs parallel workers, and an incremental re-run vs a full one.

Trains the default grid of ``params.yaml`` (model, lr x batch_size) on the
real prepared data (``data/prepared``, Fashion-MNIST: 54,000 train / 6,000
val) with ``--epochs`` epochs per run (default 1, to keep it short), through
the same ``run_search`` the train stage uses, with MLflow off:

* sequential: one run after another in this process, with every core's thread (``grid.workers: 1``);
* parallel: ``grid.workers`` processes (default: auto) with ``cores // workers``
  torch threads each, spawn, worker start-up and data loading included;
* incremental: the grid with one more lr value, the default grid's runs
  already in the run cache, vs the same grid trained in full.

Prints medians and ratios as a table, and writes ``benchmarks/out/bench_grid.json``.
Usage: ``python benchmarks/bench_grid.py [--epochs 1] [--repeats 3] [--workers auto]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from summary import record

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per variant; the median is reported")
    parser.add_argument("--workers", default="auto", help="grid.workers for the parallel variant (default auto)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    parser.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "bench_grid.json")
    return parser.parse_args()


def machine() -> dict[str, object]:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "loadavg_1_5_15": [round(x, 2) for x in load]}


def main() -> None:
    args = parse_args()
    import yaml

    from cnnpipe.compute.parallelism import cpu_cores
    from cnnpipe.search.backend_choice import make_executor
    from cnnpipe.search.backend_sequential import SequentialExecutor
    from cnnpipe.search.trial import TrainContext
    from cnnpipe.search.runner import run_search
    from cnnpipe.engine.data import TrainData
    from cnnpipe.params.load import parse_params
    from cnnpipe.store.run_cache import GridCache, RunCache
    from cnnpipe.search.space import expand

    raw = yaml.safe_load(args.params.read_text())
    raw.update({"epochs": args.epochs, "mlflow": {**raw.get("mlflow", {}), "enabled": False}})
    params = parse_params(raw)
    configs = expand(params)
    lrs = list(params.training["lr"])
    wider = parse_params({**raw, "lr": [*lrs, min(lrs) / 10]})
    wider_configs = expand(wider)
    data = TrainData.load(args.prepared, splits=("train", "val"))
    settings = params.grid.model_copy(update={"workers": args.workers if args.workers == "auto" else int(args.workers),
                                              "backend": "local"})
    before = machine()
    print(f"machine: {before['cpu']}, {before['cores']} cores, torch {before['torch']}, load {before['loadavg_1_5_15']}")
    print(f"grid: {len(configs)} runs ({', '.join(c.name for c in configs)}), model {params.training['model'][0]}, "
          f"{args.epochs} epoch(s) each, {len(data.train)} train / {len(data.val)} val images, MLflow off")

    def timed(label: str, executor, configs_, cache=None) -> float:
        ctx = TrainContext(data=data, progress=False, prepared_dir=args.prepared)
        start = time.perf_counter()
        records = run_search(configs_, ctx, executor=executor, cache=cache, report=None)
        seconds = time.perf_counter() - start
        assert all(rec.result.status == "finished" for rec in records), [rec.result.stop_reason for rec in records]
        trained = sum(not rec.cached for rec in records)
        print(f"  {label}: {seconds:.1f} s ({trained} trained, {len(records) - trained} reused)", flush=True)
        return seconds

    results: dict[str, list[float]] = {"sequential": [], "parallel": [], "full": [], "incremental": []}
    with tempfile.TemporaryDirectory(prefix="bench-grid-") as tmp:
        seeded = Path(tmp) / "seeded"  # the default grid's runs, cached once
        parallel = make_executor(settings, len(configs), device="cpu")
        print(f"parallel executor: {parallel.description}")
        for repeat in range(args.repeats):
            print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
            results["sequential"].append(timed("sequential", SequentialExecutor(cpu_cores()), configs))
            store = GridCache(RunCache(seeded), reuse=False) if repeat == 0 else None  # store only: timing unaffected
            results["parallel"].append(timed("parallel", parallel, configs, store))
        grown = make_executor(settings, len(wider_configs), device="cpu")
        for repeat in range(args.repeats):
            print(f"grid + one lr ({len(wider_configs)} runs), repeat {repeat + 1}/{args.repeats}", flush=True)
            results["full"].append(timed("full", grown, wider_configs))
            cache_dir = Path(tmp) / f"cache{repeat}"
            shutil.copytree(seeded, cache_dir)
            results["incremental"].append(timed("incremental", grown, wider_configs, GridCache(RunCache(cache_dir))))

    med = {key: statistics.median(values) for key, values in results.items()}
    after = machine()
    rows = [
        ("default grid, sequential (1 process)", med["sequential"], None),
        (f"default grid, parallel ({parallel.description})", med["parallel"], med["sequential"] / med["parallel"]),
        (f"grid + one lr ({len(wider_configs)} runs), full", med["full"], None),
        (f"grid + one lr, incremental ({len(wider_configs) - len(configs)} new runs)", med["incremental"],
         med["full"] / med["incremental"]),
    ]
    print()
    print(f"{'variant':<64} {'median s':>9} {'speed-up':>9}")
    for label, seconds, ratio in rows:
        print(f"{label:<64} {seconds:>9.1f} {('%.2fx' % ratio) if ratio else '':>9}")
        record("grid", label, seconds, "s (median)", ratio, "speed-up over the row above" if ratio else "")
    print(f"(medians of {args.repeats}; {args.epochs} epoch(s) per run; load before {before['loadavg_1_5_15']}, "
          f"after {after['loadavg_1_5_15']})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine_before": before, "machine_after": after, "epochs": args.epochs,
                                    "repeats": args.repeats, "runs": [c.name for c in configs],
                                    "parallel": parallel.description, "seconds": results, "medians": med}, indent=2) + "\n")


if __name__ == "__main__":
    main()
