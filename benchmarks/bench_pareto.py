"""Two objectives: how much accuracy does a many-times-cheaper model cost? A real TPE search on accuracy and MACs.

    python benchmarks/bench_pareto.py [--train 2000] [--val 1000] [--epochs 2] [--samples 16] [--batch 4]
                                      [--models fashion_tutorial small_bn fashion_vgg mnist_net]
                                      [--batch-sizes 32 64 128] [--cost macs] [--max-cost 2e6]
                                      [--search-seed 0] [--threads 1]

The task: real Fashion-MNIST (a stratified seeded subset of Debian's
``dataset-fashion-mnist``, prepared with cnnpipe's own ``write_prepared`` by
``bench_features.prepared_subset``), ``--epochs`` epochs per trial (patience
as long), 1 torch thread, one trial at a time in this process, MLflow off, no
run cache (``cache=None``; ``CNNPIPE_NO_CACHE=1``, ``CNNPIPE_CACHE_DIR`` a
temp folder), a fresh run-state store. The space: ``model`` a choice of
built-in presets of very different sizes (default, in MACs per 28x28 image:
``fashion_tutorial`` 0.23M, ``small_bn`` 1.2M, ``fashion_vgg`` 7.7M,
``mnist_net`` 13.8M; with ``grid.strategy: tpe`` a list is a categorical
choice) x ``lr`` log-uniform [1e-4, 0.1] x ``batch_size`` a choice of
``--batch-sizes``. ``select_by: [val_top1, --cost]``, ``grid.samples``
``--samples``, ``grid.batch`` ``--batch`` (the first batch random), so the
TPE sampler is told (val_top1, counted cost) and models both objectives
(Optuna's multi-objective TPE, ``ask_tell.run_tpe``).

The selection is the train stage's own: ``cnnpipe.search.pareto.choose`` over
the unpruned records with ``max_cost`` ``--max-cost`` (default 2e6 MACs: the
two largest default models, ``fashion_vgg`` and ``mnist_net``, are over the
budget; ``--max-cost none`` selects the most accurate of all), which counts
every trial's params and MACs, marks the Pareto front and measures the front
trials' CPU latency (batch 1, 1 thread, median of 20). The reports are the
train stage's too: ``train_files.grid_frame`` and ``pareto_frame`` are
written to ``benchmarks/out/pareto_grid.csv`` and
``benchmarks/out/pareto_front.csv``, and the figure
(``cnnpipe.figures.pareto_figure.pareto_front``, drawn from the grid CSV
read back, as the plots stage draws it) to ``benchmarks/out/pareto_front.png``.

Reported: every trial (model, lr, batch size, val_top1, cost, front or not);
the front, cheapest first (run name, val_top1, params, MACs, latency ms);
the selected trial; how many trials were on the front; the ratio of the
front's cheapest to its most accurate trial in MACs and in val_top1 (and the
difference in points); the wall time in all (preparing the subset, the search, the
selection, the reports and the figure), of the search alone and of the
selection (counting + latency); the load average before and after (the machine may be
shared: seconds are this machine's at that load, accuracies do not depend on
it). Writes ``benchmarks/out/bench_pareto.json``. Not a test: no assertions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_search import isolated_subset, machine  # noqa: E402 - benchmarks/ is put on the path above

OUT = ROOT / "benchmarks" / "out"
MODELS = ["fashion_tutorial", "small_bn", "fashion_vgg", "mnist_net"]
METRIC = "val_top1"


def budget(text: str) -> float | None:
    return None if text.lower() in ("none", "null") else float(text)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=2000, help="training images (stratified subset)")
    parser.add_argument("--val", type=int, default=1000, help="validation images")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per trial (default 2)")
    parser.add_argument("--samples", type=int, default=16, help="grid.samples: the trial budget (default 16)")
    parser.add_argument("--batch", type=int, default=4, help="grid.batch (default 4; the first batch is random)")
    parser.add_argument("--models", nargs="+", default=MODELS, help=f"model presets to choose from (default {MODELS})")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 64, 128],
                        help="batch_size choice (default 32 64 128; one value: not searched)")
    parser.add_argument("--cost", choices=("macs", "params"), default="macs", help="the second objective")
    parser.add_argument("--max-cost", type=budget, default=2e6,
                        help="max_cost (default 2e6 MACs: over it are fashion_vgg and mnist_net; 'none': no budget)")
    parser.add_argument("--search-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (one trial at a time, this process; default 1, as bench_search.py)")
    parser.add_argument("--out", type=Path, default=OUT / "bench_pareto.json")
    return parser.parse_args()


def millions(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value / 1e6:.3g}M"


def search(params: Any, data: Any, prepared: Path, threads: int) -> tuple[list[Any], float]:
    """``ask_tell.run_tpe`` as the train stage calls it, MLflow off, no run cache; the records and the wall time."""
    from cnnpipe.search.ask_tell import run_tpe
    from cnnpipe.search.backend_sequential import SequentialExecutor
    from cnnpipe.search.trial import TrainContext
    from cnnpipe.store.states import RunStateStore

    with tempfile.TemporaryDirectory(prefix="bench-pareto-") as tmp:
        ctx = TrainContext(data=data, progress=False, num_threads=threads, prepared_dir=prepared,
                           state_root=Path(tmp) / "state")
        start = time.perf_counter()
        records = run_tpe(params, ctx, executor=SequentialExecutor(threads), cache=None,
                          states=RunStateStore(Path(tmp) / "state"),
                          report=lambda line: print(f"  {line}", flush=True))
        return records, time.perf_counter() - start


def main() -> None:
    started = time.perf_counter()
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pareto-data-") as scratch:
        prepared, data = isolated_subset(Path(scratch), args.train, args.val)
        import pandas as pd
        from summary import record

        from cnnpipe.figures.pareto_figure import pareto_front
        from cnnpipe.params.load import parse_params
        from cnnpipe.reports import train_files
        from cnnpipe.search.pareto import choose
        from cnnpipe.util.tables import write_csv

        batch_sizes = args.batch_sizes if len(args.batch_sizes) > 1 else args.batch_sizes[0]
        params = parse_params({
            "model": args.models, "lr": {"log_uniform": [1.0e-4, 0.1]}, "batch_size": batch_sizes,
            "epochs": args.epochs, "patience": args.epochs, "select_by": [METRIC, args.cost], "max_cost": args.max_cost,
            "grid": {"strategy": "tpe", "samples": args.samples, "batch": args.batch, "search_seed": args.search_seed,
                     "prune": "none", "workers": 1, "max_runs": max(64, args.samples)},
            "mlflow": {"enabled": False}})
        before = machine()
        print(f"machine: {before['cpu']}, {before['cores']} cores, torch {before['torch']}, optuna {before['optuna']}, "
              f"load average (1/5/15 min) {before['loadavg_1_5_15']}")
        print(f"task: {len(data.train)} train / {len(data.val)} val Fashion-MNIST images, "
              f"{args.epochs} epoch(s)/trial, {args.threads} torch thread(s), one trial at a time; {params.describe_grid()}; "
              f"{args.samples} trials in batches of {args.batch}, search_seed {args.search_seed}; "
              f"select_by {params.describe_selection()}", flush=True)

        records, search_s = search(params, data, prepared, args.threads)
        start = time.perf_counter()
        # exactly as stages/train.py selects
        best = choose([rec for rec in records if not rec.pruned], params.select_metric, params.select_cost,
                      params.max_cost, in_shape=data.image_shape, num_classes=data.num_classes)
        select_s = time.perf_counter() - start
        after = machine()

        OUT.mkdir(parents=True, exist_ok=True)
        grid_csv, front_csv, png = OUT / "pareto_grid.csv", OUT / "pareto_front.csv", OUT / "pareto_front.png"
        write_csv(grid_csv, train_files.grid_frame(records))
        front_frame = train_files.pareto_frame(records, best, args.cost)
        write_csv(front_csv, front_frame)
        grid = pd.read_csv(grid_csv, keep_default_na=True)  # as the plots stage reads reports/grid.csv
        pareto_front(grid, png, select_by=METRIC, cost=args.cost, max_cost=args.max_cost,
                     selected_run_id=best.cfg.run_id)

    cost = args.cost
    front = [rec for rec in records if rec.on_front]
    front.sort(key=lambda rec: (rec.cost.get(cost), rec.index))
    cheapest, accurate = front[0], max(front, key=lambda rec: (rec.metric(METRIC), -rec.index))
    macs_ratio = cheapest.cost.get(cost) / accurate.cost.get(cost)
    top1_ratio = cheapest.metric(METRIC) / accurate.metric(METRIC)
    points = 100 * (accurate.metric(METRIC) - cheapest.metric(METRIC))
    budget_text = "none (the most accurate)" if args.max_cost is None else f"{args.max_cost:g} {cost}"

    print()
    print(f"every trial ({len(records)}; * selected, F on the front):")
    print("| # | model | lr | batch | val_top1 | params | MACs | front |")
    print("|---:|---|---:|---:|---:|---:|---:|:---:|")
    for rec in records:
        v = rec.cfg.values
        mark = "*" if rec is best else ""
        c = rec.cost
        print(f"| {rec.index}{mark} | {v.model} | {v.lr:.3g} | {v.batch_size} | "
              f"{rec.metric(METRIC):.4f} | {millions(c.params if c else None)} | {millions(c.macs if c else None)} | "
              f"{'F' if rec.on_front else ''} |")
    print()
    print(f"the Pareto front of {METRIC} against {cost}, cheapest first ({len(front)} of {len(records)} trials; "
          f"* selected with max_cost {budget_text}):")
    print("| run | val_top1 | params | MACs | latency ms (1 thread) |")
    print("|---|---:|---:|---:|---:|")
    for rec in front:
        mark = " *" if rec is best else ""
        print(f"| `{rec.cfg.name}`{mark} | {rec.metric(METRIC):.4f} | {rec.cost.params:,} | {rec.cost.macs:,} | "
              f"{rec.latency_ms:.3f} |")
    print()
    print(f"selected: {best.cfg.name} (trial {best.index}): {METRIC} {best.metric(METRIC):.4f}, "
          f"{best.cost.params:,} params, {best.cost.macs:,} MACs, {best.latency_ms:.3f} ms")
    print(f"front's cheapest ({cheapest.cfg.values.model}, trial {cheapest.index}) vs its most accurate "
          f"({accurate.cfg.values.model}, trial {accurate.index}): {macs_ratio:.3f}x the {cost} "
          f"({1 / macs_ratio:.1f}x cheaper), {top1_ratio:.3f}x the {METRIC} ({points:.1f} points less)")
    total_s = time.perf_counter() - started
    print(f"wall time: {total_s:.0f} s in all (data subset, search, selection, reports, figure); "
          f"search {search_s:.0f} s ({search_s / max(1, len(records)):.1f} s/trial), selection "
          f"(counting + front latency) {select_s:.1f} s; load average before {before['loadavg_1_5_15']}, "
          f"after {after['loadavg_1_5_15']} ({before['cores']} cores: seconds are this machine's at that load)")
    print(f"wrote {grid_csv.relative_to(ROOT)}, {front_csv.relative_to(ROOT)}, {png.relative_to(ROOT)}")

    record("pareto", f"trials on the front ({len(records)} trials)", len(front), "trials", None, "")
    record("pareto", f"front: cheapest vs most accurate, {cost}", macs_ratio, "ratio", None, "")
    record("pareto", f"front: cheapest vs most accurate, {METRIC}", top1_ratio, "ratio", None, "")
    record("pareto", "search wall time", search_s, "s", None, "")

    args.out.write_text(json.dumps({
        "machine_before": before, "machine_after": after, "args": {k: str(v) for k, v in vars(args).items()},
        "space": {"model": args.models, "lr": {"log_uniform": [1.0e-4, 0.1]}, "batch_size": args.batch_sizes},
        "total_s": total_s, "search_s": search_s, "select_s": select_s,
        "selected": best.cfg.name, "selected_run_id": best.cfg.run_id,
        "front_size": len(front), "trials": len(records),
        "cheapest_vs_most_accurate": {"cost": cost, "cost_ratio": macs_ratio, "top1_ratio": top1_ratio,
                                      "top1_points_less": points, "cheapest": cheapest.cfg.name,
                                      "most_accurate": accurate.cfg.name},
        "front": train_files.frame_records(front_frame),
        "trials_table": [{"index": rec.index, "name": rec.cfg.name, "model": rec.cfg.values.model,
                          "lr": rec.cfg.values.lr, "batch_size": rec.cfg.values.batch_size,
                          METRIC: rec.metric(METRIC) if rec.ok else None, "status": rec.status,
                          "params": rec.cost.params if rec.cost else None, "macs": rec.cost.macs if rec.cost else None,
                          "on_front": rec.on_front, "seconds": rec.result.seconds} for rec in records],
    }, indent=1, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else str(x)) + "\n")
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
