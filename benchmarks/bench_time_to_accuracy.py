"""Time to accuracy of the strong Fashion-MNIST preset on this machine's CPU.

    python benchmarks/bench_time_to_accuracy.py [--prepared data/prepared] [--target 0.925] [--threads N]
        [--ema 0.999] [--tta flip] [--tutorial-epochs 2] [--monitor val_top1]

Trains ``fashion_vgg`` with the training params documented next to it in
``presets.yaml`` (AdamW, onecycle, crop+flip) and, after
every epoch, measures test top-1 on the 10k test images. Test accuracy is
only *reported* here (the pipeline never selects on it). Prints one row per
epoch and the first epoch / training time at which ``--target`` was reached,
then the final model's test accuracy: the epoch the run keeps by its
``monitor`` (``val_loss`` in the recipe; ``--monitor val_top1`` keeps the
epoch with the best validation top-1, as ``select_by: val_top1`` does in the
pipeline). Training time is
the sum of the engine's epoch times (training + validation); the per-epoch
test evaluation is excluded from it.

``--ema`` trains with a weight moving average (validated and returned when
on), ``--tta flip`` scores test images with flip test-time augmentation.
``--tutorial-epochs K`` first times K epochs of the tutorial loop
(``bench_engine.tutorial_epoch``) in this same process and prints, next to
the result, the budgets of issue 17: 60 and 120 tutorial epochs of wall
time, and the test top-1 reached within each (so the ratio holds on any
machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from cnnpipe.engine.data import TrainData
from cnnpipe.engine.inference import evaluate_logits
from cnnpipe.engine.loop import train_run
from cnnpipe.engine.records import EpochRecord
from cnnpipe.engine.metrics import topk_accuracy  # noqa: E402
from cnnpipe.models.presets import PRESETS  # noqa: E402
from cnnpipe.params.run_config import RunConfig
from cnnpipe.params.values import TrainingValues
from summary import record  # noqa: E402

# Keep in sync with the comment above fashion_vgg in src/cnnpipe/models/presets.yaml.
RECIPE = dict(model="fashion_vgg", optimizer="adamw", lr=0.005, weight_decay=0.05, batch_size=128,
              schedule="onecycle", epochs=18, augment="crop_flip", label_smoothing=0.0, monitor="val_loss",
              patience=18, seed=42)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prepared", default=str(ROOT / "data" / "prepared"))
    parser.add_argument("--target", type=float, default=0.925)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
    parser.add_argument("--seed", type=int, default=RECIPE["seed"])
    parser.add_argument("--ema", type=float, default=0.0, help="weight moving-average decay (0 = off)")
    parser.add_argument("--tta", choices=("none", "flip"), default="none", help="test-time augmentation for test scores")
    parser.add_argument("--tutorial-epochs", type=int, default=0, help="time this many tutorial-loop epochs first")
    parser.add_argument("--monitor", choices=("val_loss", "val_top1"), default=RECIPE["monitor"],
                        help="which validation metric picks the epoch the run keeps")
    args = parser.parse_args()

    tutorial_s = None
    if args.tutorial_epochs > 0:
        import tempfile

        sys.path.insert(0, str(ROOT / "benchmarks"))
        from bench_engine import torchvision_root, tutorial_epoch

        with tempfile.TemporaryDirectory(prefix="bench-fmnist-") as tmp:
            root = torchvision_root(Path(tmp))
            rates = [tutorial_epoch(root, args.threads) for _ in range(args.tutorial_epochs)]
        tutorial_s = 60_000 / sorted(rates)[len(rates) // 2]
        print(f"tutorial loop: {tutorial_s:.1f} s per epoch (median of {len(rates)}); budgets: 60 epochs = "
              f"{60 * tutorial_s:.0f} s, 120 epochs = {120 * tutorial_s:.0f} s", flush=True)

    data = TrainData.load(args.prepared)
    assert data.test is not None
    recipe = {**RECIPE, "epochs": args.epochs, "patience": max(RECIPE["patience"], args.epochs), "seed": args.seed,
              "ema": args.ema, "monitor": args.monitor}
    cfg = RunConfig(values=TrainingValues(**recipe), layers=tuple(PRESETS["fashion_vgg"]), dataset=data.dataset)
    print(f"fashion_vgg on {data.dataset}: {len(data.train)} train / {len(data.val)} val / {len(data.test)} test, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.2f}", flush=True)
    print("recipe: " + ", ".join(f"{k}={v}" for k, v in recipe.items() if k != "model"), flush=True)
    print(f"{'epoch':>5}{'train_s':>9}{'cum_s':>8}{'img/s':>8}{'val_loss':>10}{'val_top1':>10}{'test_top1':>11}{'load':>6}", flush=True)

    elapsed = 0.0
    reached: tuple[int, float, float] | None = None
    curve: list[tuple[float, float]] = []  # (training seconds so far, test top-1)

    def on_epoch(record: EpochRecord, model: torch.nn.Module) -> None:
        nonlocal elapsed, reached
        elapsed += record.epoch_seconds
        logits = evaluate_logits(model, data.test.images, mean=data.mean, std=data.std, batch_size=1000, tta=args.tta)
        test_top1 = topk_accuracy(logits, data.test.labels, (1,))[1]
        curve.append((elapsed, test_top1))
        if reached is None and test_top1 >= args.target:
            reached = (record.epoch, elapsed, test_top1)
        print(f"{record.epoch:>5}{record.epoch_seconds:>9.1f}{elapsed:>8.1f}{record.images_per_s:>8.0f}"
              f"{record.val_loss:>10.4f}{record.val_top1:>10.4f}{test_top1:>11.4f}{os.getloadavg()[0]:>6.2f}", flush=True)

    start = time.perf_counter()
    result = train_run(cfg, data, num_threads=args.threads, on_epoch=on_epoch, progress=False)
    wall = time.perf_counter() - start
    assert result.model is not None
    final = topk_accuracy(evaluate_logits(result.model, data.test.images, mean=data.mean, std=data.std, tta=args.tta),
                          data.test.labels, (1,))[1]
    print(f"\nstatus {result.status} ({result.stop_reason}), best epoch {result.best_epoch}: "
          f"test top-1 {final:.4f} after {elapsed:.0f} s of training ({wall:.0f} s wall with per-epoch test evals)")
    record("time_to_accuracy", f"fashion_vgg test top-1 after {len(result.history)} epoch(s)", final, "top-1")
    record("time_to_accuracy", f"time to {args.target:.1%} test top-1", reached[1] if reached else float("nan"),
           "s of training" if reached else "s (not reached)")
    if reached:
        print(f"target {args.target:.3f} first reached at epoch {reached[0]} after {reached[1]:.0f} s of training (test {reached[2]:.4f})")
    else:
        print(f"target {args.target:.3f} not reached")
    if tutorial_s is not None:
        for epochs in (60, 120):
            within = [top1 for seconds, top1 in curve if seconds <= epochs * tutorial_s]
            last = f"{within[-1]:.4f}" if within else "no epoch finished"  # the last epoch, never the best by test
            print(f"within {epochs} tutorial epochs ({epochs * tutorial_s:.0f} s): test top-1 after the last epoch done {last}")
    return 0 if reached else 1


if __name__ == "__main__":
    raise SystemExit(main())
