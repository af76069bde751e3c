"""Engine throughput vs the classic tutorial loop, on real Fashion-MNIST.

    python benchmarks/bench_engine.py [--prepared data/prepared] [--repeats 3] [--threads N]

Four measurements of one epoch of ``fashion_tutorial`` (batch 100, Adam,
lr 0.01) and two of evaluating the 10k test images, each repeated and
reported as a median (images/s, so the engine's 54k-image train split and
the tutorial's 60k compare fairly):

* ``tutorial``: torchvision ``FashionMNIST`` + ``ToTensor`` + ``DataLoader``
  (batch 100, shuffle), the loop of the PyTorch/deeplizard tutorials.
* ``engine``: ``cnnpipe.engine.train_run`` for one epoch (augment none,
  validation included in its wall time).
* ``floor``: the same model and optimizer stepping on one preloaded batch
  (no data handling, no validation): what the model's compute alone costs.
* ``eval``: ``evaluate_logits`` (batch 1000) vs a ``DataLoader`` loop under
  ``torch.no_grad()`` (batch 1000).

Repeats are interleaved (tutorial, engine, floor, tutorial, ...) so a load
spike from other processes hits every variant alike. Not a test: no
assertions, just a table. The tutorial data comes from
``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist``)
or ``data/raw/fashion-mnist``, decompressed into a temp folder for
torchvision's reader.
"""

from __future__ import annotations

import argparse
import gzip
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cnnpipe.engine.data import TrainData
from cnnpipe.engine.inference import evaluate_logits
from cnnpipe.engine.loop import train_run
from cnnpipe.models.build import build_model  # noqa: E402
from cnnpipe.models.presets import PRESETS  # noqa: E402
from cnnpipe.params.run_config import RunConfig
from cnnpipe.params.values import TrainingValues
from summary import record  # noqa: E402

RAW_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
RAW_DIRS = (Path("/usr/share/datasets/fashion-mnist"), ROOT / "data" / "raw" / "fashion-mnist")
BATCH = 100
LR = 0.01


def torchvision_root(tmp: Path) -> Path:
    """A folder torchvision's FashionMNIST reads offline: decompressed IDX files under FashionMNIST/raw."""
    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW_NAMES:
        for folder in RAW_DIRS:
            source = folder / f"{name}.gz"
            if source.is_file():
                with gzip.open(source) as src, open(raw / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
                break
        else:
            raise SystemExit(f"{name}.gz not found in {', '.join(map(str, RAW_DIRS))}; apt-get install dataset-fashion-mnist")
    return tmp


def tutorial_epoch(root: Path, threads: int) -> float:
    """The tutorial loop for one epoch; returns images/s."""
    import torchvision
    from torch.utils.data import DataLoader

    torch.set_num_threads(threads)
    train_set = torchvision.datasets.FashionMNIST(root, train=True, download=False, transform=torchvision.transforms.ToTensor())
    loader = DataLoader(train_set, batch_size=BATCH, shuffle=True)
    torch.manual_seed(0)
    network = build_model(PRESETS["fashion_tutorial"], (1, 28, 28), 10)
    optimizer = torch.optim.Adam(network.parameters(), lr=LR)
    start = time.perf_counter()
    total_loss, total_correct = 0.0, 0
    for images, labels in loader:
        preds = network(images)
        loss = F.cross_entropy(preds, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * labels.shape[0]
        total_correct += preds.argmax(dim=1).eq(labels).sum().item()
    return len(train_set) / (time.perf_counter() - start)


def engine_epoch(data: TrainData, threads: int) -> float:
    """One epoch through ``train_run`` (wall time of the whole call, validation included)."""
    values = TrainingValues(model="fashion_tutorial", lr=LR, batch_size=BATCH, epochs=1, augment="none", seed=0)
    cfg = RunConfig(values=values, layers=tuple(PRESETS["fashion_tutorial"]))
    start = time.perf_counter()
    result = train_run(cfg, data, num_threads=threads, progress=False)
    seconds = time.perf_counter() - start
    assert result.status == "finished"
    return len(data.train) / seconds


def floor_epoch(data: TrainData, threads: int) -> float:
    """Same model/optimizer/layout as the engine, one fixed preloaded batch: compute only."""
    from cnnpipe.engine.loop import use_channels_last

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(PRESETS["fashion_tutorial"], (1, 28, 28), 10)
    x = data.train.images[:BATCH].float().div_(255)
    y = data.train.labels[:BATCH]
    if use_channels_last(model, "cpu"):
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, foreach=True)
    steps = len(data.train) // BATCH
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * BATCH / (time.perf_counter() - start)


def eval_engine(data: TrainData, model: torch.nn.Module, threads: int) -> float:
    torch.set_num_threads(threads)
    assert data.test is not None
    start = time.perf_counter()
    logits = evaluate_logits(model, data.test.images, mean=data.mean, std=data.std, batch_size=1000)
    seconds = time.perf_counter() - start
    assert logits.shape == (len(data.test), 10)
    return len(data.test) / seconds


def eval_dataloader(root: Path, model: torch.nn.Module, threads: int) -> float:
    import torchvision
    from torch.utils.data import DataLoader

    torch.set_num_threads(threads)
    test_set = torchvision.datasets.FashionMNIST(root, train=False, download=False, transform=torchvision.transforms.ToTensor())
    loader = DataLoader(test_set, batch_size=1000)
    model.eval()
    start = time.perf_counter()
    correct = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += model(images).argmax(dim=1).eq(labels).sum().item()
    return len(test_set) / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prepared", default=str(ROOT / "data" / "prepared"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--eval-repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--eval-only", action="store_true", help="skip the three training measurements")
    args = parser.parse_args()

    data = TrainData.load(args.prepared)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {args.threads} thread(s), {os.cpu_count()} cpu(s), load average {load:.2f}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}", flush=True)
    results: dict[str, list[float]] = {"tutorial": [], "engine": [], "floor": [], "eval_dataloader": [], "eval_engine": []}
    with tempfile.TemporaryDirectory(prefix="bench-fmnist-") as tmp:
        root = torchvision_root(Path(tmp))
        if not args.eval_only:
            engine_epoch(data, args.threads)  # warm-up: oneDNN primitive caches, allocator
        for rep in range(0 if args.eval_only else args.repeats):
            for name, fn in (("tutorial", lambda: tutorial_epoch(root, args.threads)),
                             ("engine", lambda: engine_epoch(data, args.threads)),
                             ("floor", lambda: floor_epoch(data, args.threads))):
                results[name].append(fn())
                print(f"  repeat {rep + 1}: {name:<9} {results[name][-1]:>9.0f} images/s", flush=True)
        torch.manual_seed(0)
        model = build_model(PRESETS["fashion_tutorial"], (1, 28, 28), 10).eval()
        eval_engine(data, model, args.threads)
        for _ in range(args.eval_repeats):
            results["eval_dataloader"].append(eval_dataloader(root, model, args.threads))
            results["eval_engine"].append(eval_engine(data, model, args.threads))

    med = {name: statistics.median(values) if values else float("nan") for name, values in results.items()}
    print()
    print(f"{'measurement':<34}{'median images/s':>16}{'vs tutorial':>13}{'runs':>6}")
    rows = [
        ("train epoch: tutorial loop", "tutorial", "tutorial"),
        ("train epoch: cnnpipe engine", "engine", "tutorial"),
        ("train epoch: compute floor", "floor", "tutorial"),
        ("eval 10k test: DataLoader loop", "eval_dataloader", "eval_dataloader"),
        ("eval 10k test: evaluate_logits", "eval_engine", "eval_dataloader"),
    ]
    for label, key, base in rows:
        print(f"{label:<34}{med[key]:>16.0f}{med[key] / med[base]:>12.2f}x{len(results[key]):>6}")
        record("engine", label, med[key], "images/s (median)", med[key] / med[base], base)
    print(f"\nengine reaches {med['engine'] / med['floor']:.0%} of the compute floor; load average now {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
