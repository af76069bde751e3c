"""Stage `prepare`: raw files -> data/prepared/ (train/val/test) and reports/samples.png."""

from __future__ import annotations

from pathlib import Path

from cnnpipe.codegraph.stage_deps import check_code_deps
from cnnpipe.util.errors import answer_help, run_entry_point


def prepare_folder_stage(params, out: Path) -> int:  # type: ignore[no-untyped-def]
    """``data.dataset: folder``: decode, split and report the class-per-folder images."""
    import json
    import sys

    from cnnpipe.data.folder import tree_digest
    from cnnpipe.data.folder_prepare import describe, prepare_folder
    from cnnpipe.data.folder_source import MANIFEST, images_root
    from cnnpipe.util.errors import DataError

    data = params.data
    raw = Path("data/raw/folder")
    try:
        manifest = json.loads((raw / MANIFEST).read_text())
    except (FileNotFoundError, ValueError):
        raise DataError(f"{raw / MANIFEST} is missing; run the download stage first (dvc repro download)") from None
    if manifest.get("source") != data.source:
        raise DataError(f"{raw} was made from {manifest.get('source')}, but data.source is {data.source}; run dvc repro")
    root = images_root(raw, data.source)
    digest, _ = tree_digest(root)
    if digest != manifest.get("tree_sha256"):
        raise DataError(f"{root} changed since the download stage ran; run dvc repro (after `dvc add {root}` "
                        "if it is your DVC-tracked folder)")
    result = prepare_folder(
        root, out, image_size=data.image_size, channels=data.channels, val_fraction=data.val_fraction,
        test_fraction=data.test_fraction, split_seed=data.split_seed, strict=data.strict, max_pixels=data.max_pixels,
        dedupe=data.dedupe, samples_path=Path("reports/samples.png"), progress=sys.stderr.isatty(),
        source_digest=digest,
    )
    for line in describe(result, data.source, data.dedupe):
        print(line)
    stats = result.stats
    sizes = ", ".join(f"{name} {stats.sizes[name]:,}" for name in ("train", "val", "test"))
    print(f"prepare: folder: {sizes} images of {'x'.join(map(str, stats.image_shape))}, {stats.num_classes} classes "
          f"in {result.seconds:.1f} s; wrote {out}/ (fingerprint {stats.fingerprint}) and reports/samples.png")
    return 0


def main() -> int:
    check_code_deps(__file__)  # dvc.yaml must declare every package this stage runs
    from cnnpipe.params.stage_sections import load_sections

    params = load_sections("data")
    from cnnpipe.data.prepare import prepare_dataset
    from cnnpipe.data.registry import get_dataset

    data = params.data
    spec = get_dataset(data.dataset)
    out = Path("data/prepared")
    if spec.is_folder:
        return prepare_folder_stage(params, out)
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
