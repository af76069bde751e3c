"""What saving the per-epoch run state costs, per preset, as a share of one epoch.

    python benchmarks/bench_runstate.py [--steps 20] [--repeats 5]

For every model preset: build it, take a few Adam steps on random images of
its dataset's shape (batch 100) to time one optimizer step, and time
``engine.resume.save_resume_state`` of the full state the engine writes after
each epoch (weights, optimizer, early-stopping best weights, RNGs, history).
The epoch estimate is the step time times the steps of an epoch of that
dataset's training split (54,000 images for the 28x28 datasets, 45,000 for
CIFAR-10). Not a test: a table, ratios measured side by side in one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cnnpipe.engine.early_stopping import EarlyStopping  # noqa: E402
from cnnpipe.engine.resume import save_resume_state  # noqa: E402
from cnnpipe.models.build import build_model  # noqa: E402
from cnnpipe.models.presets import PRESETS  # noqa: E402

BATCH = 100


def shape_of(preset: str) -> tuple[tuple[int, int, int], int]:
    return ((3, 32, 32), 45_000) if preset.startswith("cifar") else ((1, 28, 28), 54_000)


def measure(preset: str, steps: int, repeats: int) -> dict[str, float]:
    shape, train_images = shape_of(preset)
    torch.manual_seed(0)
    model = build_model(list(PRESETS[preset]), shape, 10).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(BATCH, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (BATCH,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # warm-up, and Adam's state exists
    start = time.perf_counter()
    for _ in range(steps):
        step()
    step_s = (time.perf_counter() - start) / steps
    stopper = EarlyStopping("val_loss", 3)
    stopper.update(0.5, 1, model)
    generator = torch.Generator().manual_seed(0)
    saves = []
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):
            start = time.perf_counter()
            save_resume_state(tmp, {
                "identity": "bench", "data_fingerprint": "bench", "epoch": 1, "status": "finished",
                "model": {k: t.detach() for k, t in model.state_dict().items()}, "optimizer": optimizer.state_dict(),
                "scheduler": None, "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": None, "early": stopper.state_dict(), "history": [], "seconds": 0.0,
                "train_images": 0, "train_seconds": 0.0, "stop_reason": None,
            })
            saves.append(time.perf_counter() - start)
        size = (Path(tmp) / "state.safetensors").stat().st_size
    epoch_s = step_s * (train_images // BATCH)
    save_s = statistics.median(saves)
    return {"params": sum(p.numel() for p in model.parameters()), "mb": size / 2**20, "save_ms": save_s * 1000,
            "epoch_s": epoch_s, "share": save_s / epoch_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"{'preset':<18} {'params':>10} {'state MB':>9} {'save ms':>8} {'epoch s (est.)':>15} {'save/epoch':>10}")
    for preset in PRESETS:
        row = measure(preset, args.steps, args.repeats)
        print(f"{preset:<18} {row['params']:>10,} {row['mb']:>9.2f} {row['save_ms']:>8.1f} {row['epoch_s']:>15.1f} "
              f"{row['share']:>9.2%}", flush=True)


if __name__ == "__main__":
    main()
