"""A head grid on cached backbone features vs the same grid trained through the frozen backbone.

    python benchmarks/bench_features.py [--train 6000] [--val 1000] [--epochs 5] [--arch mobilenet_v3_small]

The 9-point head grid of issue 25 (``lr`` x ``weight_decay``, 3 x 3,
``finetune: head``) of a torchvision network on real Fashion-MNIST (a seeded
stratified subset of Debian's ``dataset-fashion-mnist``, prepared with
cnnpipe's own ``write_prepared``). ImageNet's weights cannot be
downloaded here (see below for the starting weights). Three ways, the runs one after another in
this process with the engine (``train_run``), as the train stage's search
runs them on one worker:

* ``through``: ``CNNPIPE_FEATURES=0``: every batch of every epoch goes
  through the frozen body;
* ``cached, cold``: the first run computes the body's outputs once, the
  other eight read them;
* ``cached, warm``: a later experiment: every run reads them.

Prints wall times, the speed-up, and each way's selected point (lowest best
val_loss) and validation losses. Not a test: no assertions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from cnnpipe.data.formats import load_idx  # noqa: E402
from cnnpipe.data.prepare import stratified_split  # noqa: E402
from cnnpipe.data.prepared import write_prepared  # noqa: E402
from cnnpipe.data.registry import get_dataset  # noqa: E402
from cnnpipe.engine.data import TrainData
from cnnpipe.engine.loop import train_run
from cnnpipe.store.features import FeatureCache  # noqa: E402
from cnnpipe.pretrained import fetch as pw  # noqa: E402
from cnnpipe.params.load import parse_params
from cnnpipe.search.space import expand  # noqa: E402

RAW = Path("/usr/share/datasets/fashion-mnist")
LRS = [0.03, 0.01, 0.003]
DECAYS = [0.0, 0.0005, 0.005]


def prepared_subset(out: Path, n_train: int, n_val: int, seed: int = 0) -> Path:
    """A stratified seeded subset of Fashion-MNIST's training set as cnnpipe prepared data (val from the rest)."""
    images, _ = load_idx(RAW / "train-images-idx3-ubyte.gz")
    labels, _ = load_idx(RAW / "train-labels-idx1-ubyte.gz")
    test_x, _ = load_idx(RAW / "t10k-images-idx3-ubyte.gz")
    test_y, _ = load_idx(RAW / "t10k-labels-idx1-ubyte.gz")
    images, labels = images[:, None], labels.astype(np.int64)
    fraction = (n_train + n_val) / len(labels)
    _, chosen = stratified_split(labels, fraction, seed)
    train, val = stratified_split(labels[chosen], n_val / (n_train + n_val), seed)
    splits = {"train": (images[chosen][train], labels[chosen][train]), "val": (images[chosen][val], labels[chosen][val]),
              "test": (test_x[:1000, None], test_y[:1000].astype(np.int64))}
    write_prepared(out, splits, dataset="fashion-mnist", classes=list(get_dataset("fashion-mnist").classes))
    return out


def pretrain(arch: str, data: TrainData, tmp: Path, epochs: int, threads: int) -> Path:
    """Train ``arch`` from scratch on ``data`` and save it as a cnnpipe checkpoint folder (the starting weights)."""
    from cnnpipe.models.checkpoint import save_checkpoint

    params = parse_params({"model": f"torchvision:{arch}", "pretrained": {"weights": "none"}, "lr": 0.003,
                           "batch_size": 100, "epochs": epochs, "patience": epochs, "data": {"dataset": "fashion-mnist"}})
    cfg = expand(params)[0]
    result = train_run(cfg, data, progress=False, num_threads=threads)
    folder = tmp / "pretrained_checkpoint"
    save_checkpoint(folder, result.model, {
        "model": cfg.values.model, "layers": list(cfg.layers), "in_shape": list(data.image_shape),
        "num_classes": data.num_classes, "classes": list(data.classes), "dataset": data.dataset,
        "data_fingerprint": data.fingerprint, "mean": list(data.mean), "std": list(data.std), "params": cfg.flat()})
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=6000)
    parser.add_argument("--val", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--arch", default="mobilenet_v3_small")
    parser.add_argument("--pretrain-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="cnnpipe-bench-features-") as tmp:
        tmp = Path(tmp)
        os.environ["CNNPIPE_CACHE_DIR"] = str(tmp / "cache" / "runs")
        data = TrainData.load(prepared_subset(tmp / "prepared", args.train, args.val), splits=("train", "val"))
        start = time.perf_counter()
        checkpoint = pretrain(args.arch, data, tmp, args.pretrain_epochs, args.threads)
        print(f"pretrained torchvision:{args.arch} from scratch for {args.pretrain_epochs} epoch(s) in "
              f"{time.perf_counter() - start:.0f} s: {checkpoint}", flush=True)
        params = parse_params({"model": f"torchvision:{args.arch}", "finetune": "head", "lr": LRS,
                               "weight_decay": DECAYS, "batch_size": 100, "epochs": args.epochs,
                               "patience": args.epochs, "data": {"dataset": "fashion-mnist"},
                               "pretrained": {"weights": str(checkpoint)}})
        weights = tmp / "weights"
        pw.fetch_weights(params, weights, progress=False)
        configs = expand(params, weights_dir=weights)

        def grid(features: bool) -> tuple[float, list[float]]:
            start = time.perf_counter()
            source = {"features": FeatureCache()} if features else {}
            results = [train_run(cfg, data, progress=False, num_threads=args.threads, **source) for cfg in configs]
            return time.perf_counter() - start, [r.best.val_loss for r in results]

        cold = grid(True)
        warm = grid(True)
        through = grid(False)

    print(f"{len(configs)}-point head grid (lr {LRS} x weight_decay {DECAYS}), torchvision:{args.arch}, "
          f"{args.train} train / {args.val} val Fashion-MNIST images, {args.epochs} epochs, {args.threads} threads")
    names = [cfg.name for cfg in configs]
    rows = (("through the frozen body", through), ("cached features, cold", cold), ("cached features, warm", warm))
    print(f"{'way':<26} {'seconds':>8} {'speed-up':>9}  selected")
    for label, (seconds, losses) in rows:
        best = min(range(len(losses)), key=lambda i: (losses[i], i))
        print(f"{label:<26} {seconds:>8.1f} {through[0] / seconds:>8.1f}x  {names[best]} (val_loss {losses[best]:.4f})")
    worst = max(abs(a - b) for a, b in zip(through[1], cold[1]))
    print(f"largest |best val_loss difference| between through and cached over the {len(configs)} runs: {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
