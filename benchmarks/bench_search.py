"""Does a search that learns pay? Random vs TPE vs GP vs halving, best validation loss per trial budget.

    python benchmarks/bench_search.py [--seeds 5] [--budgets 8 16 32] [--train 2000] [--val 1000]
                                      [--epochs 3] [--model fashion_tutorial] [--batch 4] [--eta 3]
                                      [--strategies random tpe gp tpe_halving halving] [--threads 1]

The task: real Fashion-MNIST (a stratified seeded subset of Debian's
``dataset-fashion-mnist``, prepared with cnnpipe's own ``write_prepared`` by
``bench_features.prepared_subset``), ``--epochs`` epochs of ``--model`` per
trial, so that a trial takes seconds. The space (5 axes, every one a range):
``lr`` log-uniform [1e-4, 0.1], ``weight_decay`` log-uniform [1e-6, 0.1],
``batch_size`` a choice of 32/64/128/256, ``label_smoothing`` uniform
[0, 0.2], ``optimizer`` a choice of adam/sgd. Selected by ``val_loss`` (plain
cross-entropy on the validation split: label smoothing only changes the
training loss). The training seed and the data split are fixed; only the
search seed (``grid.search_seed``) changes between repeats.

The strategies, each with the train stage's own search code, MLflow off, no
run cache (``cache=None``; ``CNNPIPE_NO_CACHE=1``, ``CNNPIPE_CACHE_DIR`` a temp
folder) and a fresh run-state store per (strategy, seed, budget):

* ``random``: ``grid.samples`` points drawn by ``space.expand`` (Optuna's
  ``RandomSampler``), every one trained to the end (``run_search``);
* ``tpe``: ``grid.strategy: tpe`` (``ask_tell.run_tpe``: multivariate TPE,
  constant liar, batches of ``grid.batch``, the first one random);
* ``gp``: the same ask/tell loop with Optuna's ``GPSampler(seed=search_seed,
  n_startup_trials=grid.batch)`` in place of TPE (``ask_tell.make_study`` is
  replaced in this process only; nothing in ``src/`` changes). GPSampler has
  no constant liar: the trials of one batch are asked from the same model;
* ``tpe_halving``: ``grid.strategy: tpe`` with ``grid.prune: halving``
  (successive halving, ``--eta``/``--min-epochs``, inside each batch);
* ``halving``: ``grid.strategy: halving`` over the drawn points (no model).

Budgets nest for random, tpe, gp and tpe_halving, so each runs the largest
budget once per seed and reads the smaller ones from its prefix: random draws
its points one by one from a seeded sampler whatever ``grid.samples`` is, and
the model-based loops ask batch after batch of a fixed ``grid.batch`` with
asks that depend only on the seed and the values told so far, so the first
8 (16) trials of a 32-trial search are exactly the 8-trial (16-trial) search;
with ``tpe_halving`` the halving happens inside each batch, so this holds at
batch boundaries too when every budget is a multiple of ``grid.batch``
(checked: ``--check-nesting`` runs the smaller budgets separately and
compares their trials). ``halving`` does not nest (its rungs keep
``1/eta`` of the whole budget), so each budget is its own run.

Reported per strategy and budget: the best validation loss (a halving
strategy: the best trial it did not prune, as the train stage selects), its
median and min-max over the search seeds, the epochs trained (median);
the trials each strategy needs to reach random search's median best-of-32
(the trials by which half of the seeds have reached it: the low median over
seeds, a seed that never reaches it counting as infinite; and in how many
seeds it is reached at all; halving: the smallest budget whose run reaches
it; tpe_halving: at batch ends); and the sampler's own time per trial (ask + tell wall time, training
excluded; random: the time to draw its points). Writes
``benchmarks/out/bench_search.json``. Not a test: no assertions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

STRATEGIES = ("random", "tpe", "gp", "tpe_halving", "halving")
NESTED = {"random", "tpe", "gp", "tpe_halving"}
SPACE = {
    "lr": {"log_uniform": [1.0e-4, 0.1]},
    "weight_decay": {"log_uniform": [1.0e-6, 0.1]},
    "batch_size": {"choice": [32, 64, 128, 256]},
    "label_smoothing": {"uniform": [0.0, 0.2]},
    "optimizer": {"choice": ["adam", "sgd"]},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="search seeds 0..N-1 (default 5)")
    parser.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32], help="trial budgets (default 8 16 32)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--train", type=int, default=2000, help="training images (stratified subset)")
    parser.add_argument("--val", type=int, default=1000, help="validation images")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per trial (halving: the last rung)")
    parser.add_argument("--model", default="fashion_tutorial")
    parser.add_argument("--batch", type=int, default=4, help="grid.batch of the model-based searches (default 4)")
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--min-epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (one trial at a time, this process; default 1: 2 threads ran 4.7x slower on the shared 2-core machine)")
    parser.add_argument("--check-nesting", action="store_true",
                        help="also run the smaller budgets of the nested strategies separately and compare trials")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "bench_search.json")
    return parser.parse_args()


class SamplerClock:
    """Wall time spent in ``study.ask`` and ``study.tell`` (the sampler's own cost), and the asks counted."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.asks = 0

    def wrap(self, study: Any) -> Any:
        study.ask, study.tell = self._timed(study.ask, counts=True), self._timed(study.tell, counts=False)
        return study

    def _timed(self, call: Any, *, counts: bool) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.asks += counts

        return timed


def gp_study(grid: Any, select_by: str) -> Any:
    """``ask_tell.make_study`` with Optuna's GPSampler in place of TPE (seeded, first batch random)."""
    import warnings

    import optuna

    from cnnpipe.search.ask_tell import DIRECTIONS
    from cnnpipe.search.optuna_space import new_study

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.GPSampler(seed=grid.search_seed, n_startup_trials=grid.batch)
    return new_study(sampler, DIRECTIONS[select_by])


def best_until(records: list[Any], k: int) -> float:
    """The best val_loss among trials 1..k that were not pruned (inf when none is usable)."""
    values = [rec.metric("val_loss") for rec in records if rec.index <= k and not rec.pruned and rec.ok]
    values = [v for v in values if math.isfinite(v)]
    return min(values) if values else math.inf


def one_search(strategy: str, seed: int, budget: int, data: Any, prepared: Path, args: argparse.Namespace) -> dict:
    """Run one search; its records' summaries, epochs, training wall time and sampler seconds."""
    from cnnpipe.params.load import parse_params
    from cnnpipe.search import ask_tell
    from cnnpipe.search.backend_sequential import SequentialExecutor
    from cnnpipe.search.runner import run_search
    from cnnpipe.search.space import expand, sample_points
    from cnnpipe.search.strategies import Exhaustive, SuccessiveHalving
    from cnnpipe.search.trial import TrainContext
    from cnnpipe.store.states import RunStateStore

    grid = {"strategy": {"random": "exhaustive", "halving": "halving"}.get(strategy, "tpe"), "samples": budget,
            "search_seed": seed, "batch": args.batch, "eta": args.eta, "min_epochs": args.min_epochs,
            "prune": "halving" if strategy == "tpe_halving" else "none", "workers": 1, "max_runs": max(64, budget)}
    params = parse_params({"model": args.model, **SPACE, "epochs": args.epochs, "patience": args.epochs,
                           "select_by": "val_loss", "grid": grid, "mlflow": {"enabled": False}})
    clock = SamplerClock()
    original = ask_tell.make_study
    with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
        ctx = TrainContext(data=data, progress=False, num_threads=args.threads, prepared_dir=prepared,
                           state_root=Path(tmp) / "state")
        executor = SequentialExecutor(args.threads)
        states = RunStateStore(Path(tmp) / "state")
        start = time.perf_counter()
        if strategy in ("random", "halving"):
            t0 = time.perf_counter()
            sample_points(params)  # the draws alone (expand draws them again, with the configs)
            clock.seconds, clock.asks = time.perf_counter() - t0, budget
            configs = expand(params)
            records = run_search(configs, ctx, strategy=Exhaustive() if strategy == "random" else SuccessiveHalving(params.grid),
                                 executor=executor, cache=None, states=states, report=None)
        else:
            make = gp_study if strategy == "gp" else original
            ask_tell.make_study = lambda g, s: clock.wrap(make(g, s))
            try:
                records = ask_tell.run_tpe(params, ctx, executor=executor, cache=None, states=states, report=None)
            finally:
                ask_tell.make_study = original
        wall = time.perf_counter() - start
    return {
        "strategy": strategy, "seed": seed, "budget": budget, "wall_s": wall, "sampler_s": clock.seconds,
        "asks": clock.asks, "train_s": wall - clock.seconds,
        "trials": [{"index": rec.index, "name": rec.cfg.name, "val_loss": rec.metric("val_loss") if rec.ok else None,
                    "pruned": rec.pruned, "epochs": rec.result.epochs_run, "status": rec.status} for rec in records],
        "records": records,
    }


def summarize(run: dict, budgets: list[int]) -> dict[int, dict]:
    """Best val_loss and epochs trained at each budget read from a nested run's prefix."""
    records = run["records"]
    out = {}
    for k in budgets:
        if k > run["budget"]:
            continue
        out[k] = {"best": best_until(records, k),
                  "epochs": sum(rec.result.epochs_run for rec in records if rec.index <= k)}
    return out


def trials_to_reach(run: dict, target: float, batch: int, strategy: str) -> float:
    """The first trial count whose best val_loss is <= target (inf: never); tpe_halving at batch ends."""
    records = run["records"]
    step = batch if strategy == "tpe_halving" else 1
    for k in range(step, run["budget"] + 1, step):
        if best_until(records, k) <= target:
            return k
    return math.inf


def half_reach(values: list[float]) -> float:
    """The trials by which half of the seeds have reached the target (the low median; never reached = inf).

    The low median, not the mean of the middle two: with the target at random's own median, half of random's
    seeds reach it and half never do, so the plain median of an even count would be inf by construction.
    """
    return statistics.median_low(values) if values else math.nan


def fmt_trials(value: float) -> str:
    return "not reached" if math.isinf(value) else f"{value:g}"


def machine() -> dict[str, Any]:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    import optuna

    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "optuna": optuna.__version__,
            "python": platform.python_version(), "loadavg_1_5_15": [round(x, 2) for x in load]}


def report(runs: dict, args: argparse.Namespace, budgets: list[int], before: dict, started: float,
           final: bool) -> None:
    """The table over the seeds done so far (printed after every seed, so a stopped run keeps its seeds)."""
    from summary import record

    top = budgets[-1]
    seeds = len(next(iter(runs.values())))
    nesting = {}
    if args.check_nesting:
        for strategy in NESTED & set(args.strategies):
            same = True
            for by_budget in runs[strategy].values():
                for b in budgets[:-1]:
                    part = by_budget[b]["trials"]
                    prefix = [t for t in by_budget[top]["trials"] if t["index"] <= b]
                    same &= [t["name"] for t in part] == [t["name"] for t in prefix] and \
                        [t["val_loss"] for t in part] == [t["val_loss"] for t in prefix]
            nesting[strategy] = same
            print(f"nesting check, {strategy}: the {budgets[:-1]}-trial searches are "
                  f"{'exactly' if same else 'NOT'} the prefixes of the {top}-trial search", flush=True)

    # best val_loss per (strategy, budget, seed)
    best: dict[str, dict[int, list[float]]] = {}
    epochs: dict[str, dict[int, list[int]]] = {}
    for strategy in args.strategies:
        best[strategy], epochs[strategy] = {}, {}
        for by_budget in runs[strategy].values():
            for b in budgets:
                run = by_budget[top] if strategy in NESTED else by_budget[b]
                s = summarize(run, [b])[b]
                best[strategy].setdefault(b, []).append(s["best"])
                epochs[strategy].setdefault(b, []).append(s["epochs"])

    reference = "random" if "random" in best else args.strategies[0]
    target = statistics.median(best[reference][top])
    reach: dict[str, list[float]] = {}
    for strategy in args.strategies:
        for by_budget in runs[strategy].values():
            if strategy in NESTED:
                k = trials_to_reach(by_budget[top], target, args.batch, strategy)
            else:
                k = next((b for b in budgets if best_until(by_budget[b]["records"], b) <= target), math.inf)
            reach.setdefault(strategy, []).append(k)
    sampler_ms = {s: 1000 * sum(r["sampler_s"] for by in runs[s].values() for r in by.values())
                  / max(1, sum(r["asks"] for by in runs[s].values() for r in by.values())) for s in args.strategies}
    train_per_trial = {s: sum(r["train_s"] for by in runs[s].values() for r in by.values())
                       / max(1, sum(len(r["records"]) for by in runs[s].values() for r in by.values()))
                       for s in args.strategies}

    after = machine()
    print()
    print(f"best val_loss over {seeds} search seed(s) (0..{seeds - 1}{'' if final else ', run not finished'}): "
          "median [min-max]; epochs trained (median)")
    header = f"{'strategy':<12}" + "".join(f" {'best-of-' + str(b):>24} {'epochs':>6}" for b in budgets) + \
        f" {'trials to reach':>16} {'reached':>8} {'sampler':>11}"
    print(header)
    for strategy in args.strategies:
        cells = ""
        for b in budgets:
            values = best[strategy][b]
            cells += f" {statistics.median(values):>8.4f} [{min(values):.4f}-{max(values):.4f}]" \
                     f" {statistics.median(epochs[strategy][b]):>6g}"
        k = half_reach(reach[strategy])
        reached = sum(math.isfinite(v) for v in reach[strategy])
        print(f"{strategy:<12}{cells} {fmt_trials(k):>16} {f'{reached}/{len(reach[strategy])}':>8} "
              f"{sampler_ms[strategy]:>8.1f} ms")
        if not final:
            continue
        record("search", f"{strategy}: median best val_loss of {top} trials", statistics.median(best[strategy][top]),
               "val_loss", None, "")
        record("search", f"{strategy}: trials to reach random's median best-of-{top}", k, "trials",
               k / top if math.isfinite(k) else None, f"{top} trials")
    print(f"target: {reference}'s median best-of-{top} = {target:.4f}; per-seed trials to reach it: "
          + "; ".join(f"{s} {[fmt_trials(v) for v in reach[s]]}" for s in args.strategies))
    print("training per trial (s, mean over every trained trial): "
          + ", ".join(f"{s} {train_per_trial[s]:.2f}" for s in args.strategies))
    print(f"total {time.perf_counter() - started:.0f} s; load before {before['loadavg_1_5_15']}, "
          f"after {after['loadavg_1_5_15']}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "machine_before": before, "machine_after": after, "args": {k: str(v) for k, v in vars(args).items()},
        "space": SPACE, "target": target, "nesting": nesting,
        "best": best, "epochs": epochs, "trials_to_reach": {s: [None if math.isinf(v) else v for v in r]
                                                           for s, r in reach.items()},
        "sampler_ms_per_trial": sampler_ms, "train_s_per_trial": train_per_trial,
        "runs": [{k: v for k, v in run.items() if k != "records"}
                 for s in runs.values() for by in s.values() for run in by.values()],
    }, indent=1, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else str(x)) + "\n")
    print(f"wrote {args.out}")


def isolated_subset(scratch: Path, train: int, val: int) -> tuple[Path, Any]:
    """The Fashion-MNIST subset prepared under ``scratch`` and loaded; the run cache off (in ``scratch``), no bars."""
    os.environ.update({"CNNPIPE_CACHE_DIR": str(scratch / "cache" / "runs"), "CNNPIPE_NO_CACHE": "1",
                       "CNNPIPE_TAKE_TURNS": "0", "CNNPIPE_PROGRESS": "0", "CNNPIPE_PROGRESS_EVERY": "0"})
    from bench_features import prepared_subset

    from cnnpipe.engine.data import TrainData

    prepared = prepared_subset(scratch / "prepared", train, val)
    return prepared, TrainData.load(prepared, splits=("train", "val"))


def main() -> None:
    args = parse_args()
    budgets = sorted(args.budgets)
    top = budgets[-1]
    if any(b % args.batch for b in budgets):
        print(f"note: budgets {budgets} are not all multiples of --batch {args.batch}: tpe/gp prefixes still nest, "
              "tpe_halving's do not", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-search-data-") as scratch:
        prepared, data = isolated_subset(Path(scratch), args.train, args.val)
        before = machine()
        print(f"machine: {before['cpu']}, {before['cores']} cores, torch {before['torch']}, optuna {before['optuna']}, "
              f"load {before['loadavg_1_5_15']}")
        print(f"task: {args.model}, {args.epochs} epoch(s)/trial, {len(data.train)} train / {len(data.val)} val "
              f"Fashion-MNIST images, {args.threads} torch thread(s), one trial at a time; space: "
              + ", ".join(f"{k}~{next(iter(v))}{next(iter(v.values()))}" for k, v in SPACE.items()), flush=True)
        print(f"strategies {args.strategies}, budgets {budgets}, search seeds 0..{args.seeds - 1}, "
              f"grid.batch {args.batch}, halving eta {args.eta} min_epochs {args.min_epochs}", flush=True)

        runs: dict[str, dict[int, dict[int, dict]]] = {s: {} for s in args.strategies}  # strategy -> seed -> budget
        started = time.perf_counter()
        for seed in range(args.seeds):
            for strategy in args.strategies:
                todo = [top] if strategy in NESTED else budgets
                if args.check_nesting and strategy in NESTED:
                    todo = budgets
                for budget in todo:
                    run = one_search(strategy, seed, budget, data, prepared, args)
                    runs[strategy].setdefault(seed, {})[budget] = run
                    best = best_until(run["records"], budget)
                    epochs = sum(rec.result.epochs_run for rec in run["records"])
                    print(f"  seed {seed} {strategy:<12} budget {budget:>2}: best val_loss {best:.4f}, "
                          f"{len(run['records'])} trained, {epochs} epochs, {run['wall_s']:.0f} s "
                          f"(sampler {run['sampler_s'] * 1000 / max(1, run['asks']):.1f} ms/trial; "
                          f"{time.perf_counter() - started:.0f} s elapsed)", flush=True)
            report(runs, args, budgets, before, started, final=seed == args.seeds - 1)



if __name__ == "__main__":
    main()
