"""Transfer on real Fashion-MNIST: pretrain with cnnpipe on classes 0-4, fine-tune on 5-9 from a few images.

    python benchmarks/bench_transfer.py [--archs shufflenet_v2_x0_5 resnet18] [--shots 5 20]
        [--seeds 3] [--pretrain-epochs 1] [--epochs 15] [--patience 5] [--threads 1]

Issue 25's transfer check, every run through the real engine (``train_run``):

1. **Pretrain** each torchvision architecture from random initialisation
   (``pretrained.weights: none``, ``finetune: full``) on all of Fashion-MNIST's
   training images of classes 0-4 (T-shirt/top, Trouser, Pullover, Dress,
   Coat; 30,000 images, of which a stratified 1,000 are held out as val),
   and save it as a cnnpipe checkpoint folder (``save_checkpoint`` with
   ``checkpoint_sidecar``: what the train stage writes to ``models/best``).
2. **Fine-tune** on classes 5-9 (Sandal, Shirt, Sneaker, Bag, Ankle boot)
   from 5 and from 20 training images per class (a seeded draw per seed,
   plus 5 val images per class drawn from the remaining training images, for
   early stopping and the best epoch) with four strategies, 3 seeds each:

   * ``scratch``: ``pretrained.weights: none``, ``finetune: full``;
   * ``head``: the checkpoint's body frozen, a new linear head
     (``finetune: head``: trained on cached body features);
   * ``gradual``: head only for ``freeze_epochs``, then everything with the
     body at ``lr * body_lr_mult`` (``finetune: gradual``);
   * ``full``: everything from the checkpoint (``finetune: full``).

   The checkpoint reaches each run the way a user's ``models/best`` of
   another project does: ``pretrained.weights: <folder>`` ->
   ``fetch_weights`` (the weights stage) -> ``expand(weights_dir=...)``.
3. **Score** each run's best epoch on the full test set of classes 5-9
   (5,000 images) with ``evaluate_logits`` and the run's own normalization
   (``run_normalization``: the checkpoint's for pretrained runs).

The default architectures are ``shufflenet_v2_x0_5`` (the small network)
and ``resnet18``. ``mobilenet_v3_small`` runs too (``--archs
mobilenet_v3_small``) but scores chance (0.200) in every row here: torchvision
builds its BatchNorm layers with momentum 0.01, so after one epoch from
random initialisation their running statistics still lag the weights and the
eval-mode network (which the engine validates, selects and scores) predicts
one class, while the training loss (batch statistics) falls as it should.

Prints one table: per architecture, shots and strategy, the mean and sd of
test top-1 over the seeds and the mean seconds per run (training, then
scoring); and the pretraining's own time and test top-1 on classes 0-4. Not
a test: no assertions. The seed also draws the few-shot images, so the sd
covers both the draw and the initialisation. One torch thread by default:
on a machine shared with other work, two threads that wait on each other at
every barrier ran a small network's steps ~20x slower than one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from cnnpipe.data.formats import load_idx  # noqa: E402
from cnnpipe.data.prepare import stratified_split  # noqa: E402
from cnnpipe.data.prepared import write_prepared  # noqa: E402
from cnnpipe.data.registry import get_dataset  # noqa: E402
from cnnpipe.engine.data import TrainData
from cnnpipe.engine.inference import evaluate_logits
from cnnpipe.engine.loop import train_run
from cnnpipe.engine.records import RunResult  # noqa: E402
from cnnpipe.pretrained import fetch as pw  # noqa: E402
from cnnpipe.models.checkpoint import save_checkpoint  # noqa: E402
from cnnpipe.models.torchvision_spec import run_normalization  # noqa: E402
from cnnpipe.params.load import parse_params
from cnnpipe.params.run_config import RunConfig
from cnnpipe.reports.train_files import checkpoint_sidecar  # noqa: E402
from cnnpipe.search.selection import RunRecord  # noqa: E402
from cnnpipe.search.space import expand  # noqa: E402
from cnnpipe.tracking import NullTracker  # noqa: E402
from summary import record  # noqa: E402

RAW = Path("/usr/share/datasets/fashion-mnist")
SOURCE, TARGET = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
VAL_PER_CLASS = 5
PRETRAIN_VAL = 1000
# Per strategy: the training keys that differ (lr chosen per strategy, as a user would; adam throughout).
STRATEGIES: dict[str, dict[str, Any]] = {
    "scratch": {"finetune": "full", "lr": 0.003, "pretrained": {"weights": "none"}},
    "head": {"finetune": "head", "lr": 0.01},
    "gradual": {"finetune": "gradual", "lr": 0.01, "freeze_epochs": 3, "body_lr_mult": 0.1},
    "full": {"finetune": "full", "lr": 0.001},
}


def load_fashion() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fashion-MNIST's train and test splits: uint8 N x 1 x 28 x 28 images and int64 labels."""
    out = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        images, _ = load_idx(RAW / f"{stem}-images-idx3-ubyte.gz")
        labels, _ = load_idx(RAW / f"{stem}-labels-idx1-ubyte.gz")
        out[split] = (images[:, None], labels.astype(np.int64))
    return out


def subset(images: np.ndarray, labels: np.ndarray, classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The images of ``classes``, relabelled 0..len(classes)-1 in that order."""
    keep = np.isin(labels, classes)
    relabel = np.full(10, -1, dtype=np.int64)
    relabel[list(classes)] = np.arange(len(classes))
    return images[keep], relabel[labels[keep]]


def write(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: tuple[int, ...]) -> Path:
    names = get_dataset("fashion-mnist").classes
    write_prepared(out, splits, dataset="fashion-mnist", classes=[names[c] for c in classes])
    return out


def pretrain_data(raw: dict[str, tuple[np.ndarray, np.ndarray]], out: Path, limit: int = 0) -> Path:
    """Classes 0-4: all 30,000 training images (a stratified 1,000 held out as val); their 5,000 test images.

    ``limit`` (a smoke test's) keeps only the first ``limit`` images.
    """
    images, labels = subset(*raw["train"], SOURCE)
    if limit:
        images, labels = images[:limit], labels[:limit]
    train, val = stratified_split(labels, min(PRETRAIN_VAL / len(labels), 0.2), seed=0)
    test = subset(*raw["test"], SOURCE)
    return write(out, {"train": (images[train], labels[train]), "val": (images[val], labels[val]), "test": test},
                 SOURCE)


def few_shot_data(raw: dict[str, tuple[np.ndarray, np.ndarray]], shots: int, seed: int, out: Path) -> Path:
    """Classes 5-9: ``shots`` train + ``VAL_PER_CLASS`` val images per class (seeded draw); all 5,000 test images."""
    images, labels = subset(*raw["train"], TARGET)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in range(len(TARGET)):
        drawn = rng.permutation(np.flatnonzero(labels == c))
        train.append(drawn[:shots])
        val.append(drawn[shots:shots + VAL_PER_CLASS])
    train_idx, val_idx = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    return write(out, {"train": (images[train_idx], labels[train_idx]), "val": (images[val_idx], labels[val_idx]),
                       "test": subset(*raw["test"], TARGET)}, TARGET)


def top1(cfg: RunConfig, result: RunResult, data: TrainData) -> float:
    """Test top-1 of the run's best epoch, with the normalization the run trained with."""
    assert data.test is not None
    mean, std = run_normalization(cfg.layers, data.mean, data.std)
    logits = evaluate_logits(result.model, data.test.images, mean=mean, std=std)
    return float((logits.argmax(1) == data.test.labels).float().mean())


def timed_run(cfg: RunConfig, data: TrainData, threads: int) -> tuple[float, float, float]:
    """(test top-1, training seconds, scoring seconds) of one run."""
    start = time.perf_counter()
    result = train_run(cfg, data, progress=False, num_threads=threads)
    trained = time.perf_counter()
    accuracy = top1(cfg, result, data)
    return accuracy, trained - start, time.perf_counter() - trained


def pretrain(arch: str, data_dir: Path, out: Path, args: argparse.Namespace) -> tuple[Path, float, float, int]:
    """Train ``arch`` from scratch on classes 0-4 and save it as a cnnpipe checkpoint folder (models/best's form)."""
    params = parse_params({"model": f"torchvision:{arch}", "pretrained": {"weights": "none"}, "finetune": "full",
                           "lr": 0.003, "batch_size": 100, "epochs": args.pretrain_epochs,
                           "patience": args.pretrain_epochs, "seed": 0, "data": {"dataset": "fashion-mnist"}})
    [cfg] = expand(params)
    data = TrainData.load(data_dir)
    start = time.perf_counter()
    result = train_run(cfg, data, progress=False, num_threads=args.threads)
    seconds = time.perf_counter() - start
    save_checkpoint(out, result.model, checkpoint_sidecar(RunRecord(1, cfg, result), data, NullTracker()))
    return out, seconds, top1(cfg, result, data), result.best_epoch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--archs", nargs="+", default=["shufflenet_v2_x0_5", "resnet18"])
    parser.add_argument("--shots", nargs="+", type=int, default=[5, 20])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--pretrain-epochs", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pretrain-limit", type=int, default=0, help="smoke tests only: fewer pretraining images")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    raw = load_fashion()
    rows: list[tuple[str, int, str, list[float], list[float], list[float]]] = []
    pretrained: dict[str, tuple[float, float, int]] = {}

    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-transfer-") as tmp:
        tmp = Path(tmp)
        os.environ["CNNPIPE_CACHE_DIR"] = str(tmp / "cache" / "runs")  # run and feature caches: this run's own
        source = pretrain_data(raw, tmp / "source", args.pretrain_limit)
        targets = {(shots, seed): TrainData.load(few_shot_data(raw, shots, seed, tmp / f"target-{shots}-{seed}"))
                   for shots in args.shots for seed in range(args.seeds)}
        for arch in args.archs:
            folder, seconds, accuracy, best_epoch = pretrain(arch, source, tmp / f"best-{arch}", args)
            pretrained[arch] = (seconds, accuracy, best_epoch)
            print(f"pretrained torchvision:{arch} on classes 0-4: {seconds:.0f} s, best epoch {best_epoch}, "
                  f"test top-1 {accuracy:.3f}", flush=True)
            for shots in args.shots:
                for name in args.strategies:
                    accs, train_s, score_s = [], [], []
                    for seed in range(args.seeds):
                        raw_params = {"model": f"torchvision:{arch}", "pretrained": {"weights": str(folder)},
                                      "batch_size": args.batch_size, "epochs": args.epochs,
                                      "patience": args.patience, "seed": seed,
                                      "data": {"dataset": "fashion-mnist"}} | STRATEGIES[name]
                        params = parse_params(raw_params)
                        weights = tmp / f"weights-{arch}"
                        if params.pretrained.weights != "none" and not weights.exists():
                            pw.fetch_weights(params, weights, progress=False)  # the weights stage, once per arch
                        [cfg] = expand(params, weights_dir=weights if params.pretrained.weights != "none" else None)
                        accuracy, t_train, t_score = timed_run(cfg, targets[(shots, seed)], args.threads)
                        accs.append(accuracy), train_s.append(t_train), score_s.append(t_score)
                    rows.append((arch, shots, name, accs, train_s, score_s))
                    print(f"  {arch} {shots:>2} shots {name:<8} top-1 "
                          f"{' '.join(f'{a:.3f}' for a in accs)}  train {statistics.mean(train_s):.1f} s/run",
                          flush=True)

    print()
    print(f"Fashion-MNIST, pretrain on classes 0-4 ({args.pretrain_epochs} epochs, batch 100, adam lr 0.003), "
          f"fine-tune on 5-9: {args.epochs} epochs max, patience {args.patience}, batch {args.batch_size}, "
          f"{VAL_PER_CLASS} val images per class; test top-1 on classes 5-9's 5,000 test images, "
          f"{args.seeds} seeds; {args.threads} threads")
    for arch, (seconds, accuracy, best_epoch) in pretrained.items():
        print(f"pretraining torchvision:{arch}: {seconds:.0f} s, test top-1 on classes 0-4 {accuracy:.3f} "
              f"(best epoch {best_epoch})")
    print(f"| {'architecture':<20} | shots/class | {'strategy':<8} | top-1 mean | top-1 sd | train s/run | "
          f"score s/run |")
    print(f"|{'-' * 22}|-------------|{'-' * 10}|-----------:|---------:|------------:|------------:|")
    for arch, shots, name, accs, train_s, score_s in rows:
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {arch:<20} | {shots:>11} | {name:<8} | {statistics.mean(accs):>10.3f} | {sd:>8.3f} | "
              f"{statistics.mean(train_s):>11.1f} | {statistics.mean(score_s):>11.1f} |")
        record("transfer", f"{arch} {shots}/class {name}: test top-1 (mean of {len(accs)} seeds)",
               statistics.mean(accs), "top-1")
    print(f"total wall time {time.perf_counter() - begin:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
