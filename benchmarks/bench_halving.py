"""Successive halving vs the exhaustive grid on real Fashion-MNIST, side by side in one run.

    python benchmarks/bench_halving.py [--prepared data/prepared] [--epochs 9] [--eta 3] [--workers auto]
                                       [--weight-decay 0 5e-4 5e-3] [--no-spread] [--model small_bn]
                                       [--seeds 43 44]

The same 9-point grid (lr x batch_size of ``fashion_tutorial``, or ``--model``, ``epochs``
each, early stopping with patience 3) searched twice with the train stage's
own ``run_search``, MLflow off, fresh run-state stores: exhaustively, and by
successive halving (eta 3, first rung 1 epoch: rungs at 1, 3, 9), and halving
again with ``grid.spread_threads`` (a rung with fewer trials than workers
gets the idle workers' cores; ``--no-spread`` skips it). ``--weight-decay``
adds a third axis (three values: the issue's 27-point example grid). Reported:
epochs trained, wall time, the config each selects by val_loss, and that
config's test top-1 (the test split is read only here, after selection).
``--seeds`` then retrains each strategy's pick with those extra seeds (same
data split, exhaustive): the spread of one config's test top-1 over seeds is
the noise floor that the picks' difference is measured against.
Not a test: a table, ratios measured in the same run on the same machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prepared", type=Path, default=ROOT / "data" / "prepared")
    parser.add_argument("--epochs", type=int, default=9)
    parser.add_argument("--eta", type=int, default=3)
    parser.add_argument("--min-epochs", type=int, default=1)
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--weight-decay", type=float, nargs="+", default=None,
                        help="a weight_decay axis (e.g. 0 5e-4 5e-3: 27 points)")
    parser.add_argument("--no-spread", action="store_true", help="skip the grid.spread_threads row")
    parser.add_argument("--model", default="fashion_tutorial", help="the preset every point trains (small_bn: the default)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[],
                        help="retrain each pick with these extra seeds: test top-1 mean and sd per pick")
    args = parser.parse_args()

    from cnnpipe.search.backend_choice import make_executor
    from cnnpipe.engine.data import TrainData
    from cnnpipe.engine.inference import evaluate_logits
    from cnnpipe.engine.metrics import topk_accuracy
    from cnnpipe.params.load import parse_params
    from cnnpipe.search.runner import run_search
    from cnnpipe.store.states import RunStateStore
    from cnnpipe.search.selection import select_best
    from cnnpipe.search.space import expand
    from cnnpipe.search.strategies import Exhaustive, halving
    from cnnpipe.search.trial import TrainContext

    axes = {"lr": [0.01, 0.003, 0.001], "batch_size": [64, 256, 1024]}
    if args.weight_decay:
        axes["weight_decay"] = args.weight_decay
    params = parse_params({"model": args.model, **axes, "epochs": args.epochs, "patience": 3, "select_by": "val_loss",
                           "grid": {"workers": args.workers if args.workers == "auto" else int(args.workers)},
                           "mlflow": {"enabled": False}})
    configs = expand(params)
    data = TrainData.load(args.prepared, splits=("train", "val", "test"))
    executor = make_executor(params.grid, len(configs), device="cpu")
    print(f"{len(configs)} points x {args.epochs} epochs of {args.model} on {len(data.train)} train images; "
          f"executor: {executor.description}", flush=True)

    def test_top1(rec) -> float:
        logits = evaluate_logits(rec.result.model, data.test.images, mean=data.mean, std=data.std)
        return topk_accuracy(logits, data.test.labels, (1,))[1]

    spreading = make_executor(params.grid.model_copy(update={"spread_threads": True}), len(configs),
                                        device="cpu")
    rows = []
    picks: dict[str, tuple] = {}  # name -> (config, test top-1 at the grid's seed)
    variants = [("exhaustive grid", Exhaustive(), executor),
                (f"successive halving (eta {args.eta})", halving(args.eta, args.min_epochs), executor),
                ("  + grid.spread_threads", halving(args.eta, args.min_epochs), spreading)]
    for label, strategy, executor in variants[:2] if args.no_spread else variants:
        with tempfile.TemporaryDirectory(prefix="bench-halving-") as tmp:
            ctx = TrainContext(data=data, progress=False, prepared_dir=args.prepared, state_root=Path(tmp))
            start = time.perf_counter()
            records = run_search(configs, ctx, strategy=strategy, executor=executor, states=RunStateStore(tmp),
                                 report=lambda line: print(f"  {line}", flush=True) if line.startswith(("rung", "grid.")) else None)
            seconds = time.perf_counter() - start
        best = select_best([rec for rec in records if not rec.pruned], "val_loss")
        epochs = sum(rec.result.epochs_run for rec in records)
        top1 = test_top1(best)
        rows.append((label, epochs, seconds, best.cfg.name, best.metric("val_loss"), top1))
        picks.setdefault(best.cfg.name, (best.cfg, top1))
        print(f"{label}: {epochs} epochs, {seconds:.0f} s, selected {best.cfg.name}", flush=True)

    base = rows[0]
    print()
    print(f"{'strategy':<28} {'epochs':>7} {'share':>6} {'wall s':>7} {'share':>6}  {'selected':<28} {'val_loss':>8} {'test top-1':>10}")
    for label, epochs, seconds, name, val_loss, top1 in rows:
        print(f"{label:<28} {epochs:>7} {epochs / base[1]:>6.0%} {seconds:>7.0f} {seconds / base[2]:>6.0%}  "
              f"{name:<28} {val_loss:>8.4f} {top1:>10.2%}")
    print(f"test top-1 difference of the picks: {abs(rows[1][5] - base[5]) * 100:.2f} percentage points")
    if args.seeds:
        seed_noise(picks, args.seeds, data, executor, args.prepared, test_top1)
    if not args.no_spread:
        print("(+ grid.spread_threads: the rungs with fewer trials than workers get the idle workers' cores;"
              " its survivor is not bitwise the exhaustive grid's run)")


def seed_noise(picks: dict, seeds: list[int], data, executor, prepared: Path, test_top1) -> None:
    """Each pick retrained with ``seeds`` (exhaustive, MLflow off): test top-1 per seed, mean and sd."""
    import statistics

    from cnnpipe.search.runner import run_search
    from cnnpipe.store.states import RunStateStore
    from cnnpipe.search.strategies import Exhaustive
    from cnnpipe.search.trial import TrainContext

    print()
    print(f"{'pick':<36} " + " ".join(f"{'seed ' + str(s):>9}" for s in [None, *seeds]).replace("seed None", "grid seed")
          + f" {'mean':>7} {'sd':>6}")
    means = {}
    for name, (cfg, top1) in picks.items():
        configs = [cfg.model_copy(update={"values": cfg.values.model_copy(update={"seed": seed}), "axes": ("seed",)})
                   for seed in seeds]
        with tempfile.TemporaryDirectory(prefix="bench-halving-seeds-") as tmp:
            ctx = TrainContext(data=data, progress=False, prepared_dir=prepared, state_root=Path(tmp))
            records = run_search(configs, ctx, strategy=Exhaustive(), executor=executor, states=RunStateStore(tmp),
                                 report=lambda line: None)
        scores = [top1, *(test_top1(rec) for rec in records)]
        means[name] = statistics.mean(scores)
        print(f"{name:<36} " + " ".join(f"{score:>9.2%}" for score in scores)
              + f" {means[name]:>7.2%} {statistics.stdev(scores) * 100:>5.2f}p", flush=True)
    if len(means) > 1:
        first, *others = means.values()
        print("difference of the picks' means: "
              + ", ".join(f"{abs(other - first) * 100:.2f}" for other in others) + " percentage points")


if __name__ == "__main__":
    main()
