"""Stage `prepare`: raw files -> data/prepared/ (train/val/test) and reports/samples.png."""

from __future__ import annotations

from pathlib import Path

from cnnpipe.errors import answer_help, run_entry_point


def main() -> int:
    from cnnpipe.params import load_params

    params = load_params()
    from cnnpipe.data.prepare import prepare_dataset
    from cnnpipe.data.registry import get_dataset

    data = params.data
    spec = get_dataset(data.dataset)
    out = Path("data/prepared")
    result = prepare_dataset(
        spec,
        Path("data/raw") / spec.name,
        out,
        val_fraction=data.val_fraction,
        split_seed=data.split_seed,
        samples_path=Path("reports/samples.png"),
    )
    stats = result.stats
    sizes = ", ".join(f"{name} {stats.sizes[name]:,}" for name in ("train", "val", "test"))
    shape = "x".join(map(str, stats.image_shape))
    print(f"prepare: {spec.name}: {sizes} images of {shape}, {stats.num_classes} classes "
          f"(val_fraction {data.val_fraction}, split_seed {data.split_seed}) in {result.seconds:.1f} s")
    print(f"prepare: wrote {out}/ (fingerprint {stats.fingerprint}) and reports/samples.png")
    return 0


if __name__ == "__main__":
    answer_help(__file__, __doc__)
    run_entry_point(main)
